//! A small MOF reader for one `instance of Class { Prop = value; ... };` block, the text form
//! (`TextFormat.Mof`) a WMI client could pass for an embedded instance. Value types are inferred:
//! quoted → string, TRUE/FALSE → boolean, integers → uint64 (sint64 when negative), reals → real64.

use crate::{CimInstance, CimType, CimValue};

/// MOF text that is not a single instance declaration.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("MOF instance at offset {offset}: {message}")]
pub struct MofError {
    pub offset: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
}

struct Lexer<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn err<T>(&self, message: impl Into<String>) -> Result<T, MofError> {
        Err(MofError {
            offset: self.pos,
            message: message.into(),
        })
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_trivia(&mut self) {
        loop {
            let r = self.rest();
            let t = r.trim_start();
            self.pos += r.len() - t.len();
            if t.starts_with("//") {
                self.pos += t.find('\n').unwrap_or(t.len());
            } else if let Some(body) = t.strip_prefix("/*") {
                self.pos += body.find("*/").map_or(t.len(), |i| i + 4);
            } else {
                return;
            }
        }
    }

    fn string(&mut self) -> Result<String, MofError> {
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next().map(|(_, e)| e) {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some(e) => out.push(e),
                    None => break,
                },
                c => out.push(c),
            }
        }
        self.err("unterminated string")
    }

    fn next(&mut self) -> Result<Option<Tok>, MofError> {
        self.skip_trivia();
        let Some(c) = self.rest().chars().next() else {
            return Ok(None);
        };
        let word = |s: &str| {
            s.find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '.' | '+' | '-')))
                .unwrap_or(s.len())
        };
        Ok(Some(match c {
            '"' => Tok::Str(self.string()?),
            c if c.is_ascii_digit() || c == '-' || c == '+' => {
                let n = word(self.rest()).max(1);
                let lit = self.rest()[..n].to_string();
                self.pos += n;
                Tok::Num(lit)
            }
            c if c.is_alphabetic() || c == '_' || c == '$' => {
                let first = c.len_utf8();
                let n = self.rest()[first..]
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .map_or(self.rest().len(), |i| i + first);
                let w = self.rest()[..n].to_string();
                self.pos += n;
                Tok::Ident(w)
            }
            c => {
                self.pos += c.len_utf8();
                Tok::Punct(c)
            }
        }))
    }
}

struct Parser<'a> {
    lx: Lexer<'a>,
    peeked: Option<Tok>,
}

impl Parser<'_> {
    fn peek(&mut self) -> Result<Option<&Tok>, MofError> {
        if self.peeked.is_none() {
            self.peeked = self.lx.next()?;
        }
        Ok(self.peeked.as_ref())
    }

    fn bump(&mut self) -> Result<Option<Tok>, MofError> {
        self.peek()?;
        Ok(self.peeked.take())
    }

    fn expect(&mut self, what: &str, ok: impl Fn(&Tok) -> bool) -> Result<Tok, MofError> {
        match self.bump()? {
            Some(t) if ok(&t) => Ok(t),
            Some(t) => self.lx.err(format!("expected {what}, found {t:?}")),
            None => self.lx.err(format!("expected {what}, found the end")),
        }
    }

    fn ident(&mut self, what: &str) -> Result<String, MofError> {
        match self.expect(what, |t| matches!(t, Tok::Ident(_)))? {
            Tok::Ident(s) => Ok(s),
            _ => self.lx.err(format!("expected {what}")),
        }
    }

    fn punct(&mut self, c: char) -> Result<(), MofError> {
        self.expect(&format!("'{c}'"), |t| *t == Tok::Punct(c))
            .map(|_| ())
    }

    /// Skips a `[...]` qualifier list if present.
    fn skip_qualifiers(&mut self) -> Result<(), MofError> {
        if self.peek()? != Some(&Tok::Punct('[')) {
            return Ok(());
        }
        while self.bump()?.is_some_and(|t| t != Tok::Punct(']')) {}
        Ok(())
    }

    fn scalar(&mut self) -> Result<Option<CimValue>, MofError> {
        let t = self.bump()?;
        Ok(Some(match t {
            Some(Tok::Str(mut s)) => {
                while let Some(Tok::Str(_)) = self.peek()? {
                    if let Some(Tok::Str(more)) = self.bump()? {
                        s.push_str(&more);
                    }
                }
                CimValue::String(s)
            }
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("true") => CimValue::Boolean(true),
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("false") => CimValue::Boolean(false),
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("null") => return Ok(None),
            Some(Tok::Num(n)) => number(&n).ok_or(MofError {
                offset: self.lx.pos,
                message: format!("'{n}' is not a number"),
            })?,
            other => return self.lx.err(format!("expected a value, found {other:?}")),
        }))
    }

    fn array(&mut self) -> Result<CimValue, MofError> {
        let mut items = Vec::new();
        if self.peek()? == Some(&Tok::Punct('}')) {
            self.bump()?;
            return Ok(CimValue::Array(CimType::String, items));
        }
        loop {
            if let Some(v) = self.scalar()? {
                items.push(v);
            }
            match self.bump()? {
                Some(Tok::Punct(',')) => {}
                Some(Tok::Punct('}')) => break,
                _ => return self.lx.err("expected ',' or '}' in an array"),
            }
        }
        Ok(unify_array(items))
    }

    fn instance(&mut self) -> Result<CimInstance, MofError> {
        self.skip_qualifiers()?;
        let kw = self.ident("'instance'")?;
        let of = self.ident("'of'")?;
        if !kw.eq_ignore_ascii_case("instance") || !of.eq_ignore_ascii_case("of") {
            return self.lx.err("expected 'instance of'");
        }
        let mut inst = CimInstance::new(&self.ident("a class name")?);
        if matches!(self.peek()?, Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("as")) {
            self.bump()?;
            self.ident("an alias")?;
        }
        self.punct('{')?;
        loop {
            self.skip_qualifiers()?;
            if self.peek()? == Some(&Tok::Punct('}')) {
                self.bump()?;
                break;
            }
            let name = self.ident("a property name")?;
            self.punct('=')?;
            let value = if self.peek()? == Some(&Tok::Punct('{')) {
                self.bump()?;
                Some(self.array()?)
            } else {
                self.scalar()?
            };
            self.punct(';')?;
            if name.starts_with("__") {
                continue;
            }
            match value {
                Some(v) => inst.set(&name, v),
                None => inst.set_null(&name, CimType::String, false),
            }
        }
        if self.peek()? == Some(&Tok::Punct(';')) {
            self.bump()?;
        }
        match self.bump()? {
            None => Ok(inst),
            Some(t) => self.lx.err(format!("unexpected {t:?} after the instance")),
        }
    }
}

fn number(n: &str) -> Option<CimValue> {
    if let Ok(v) = CimValue::parse_scalar(CimType::Uint64, n) {
        return Some(v);
    }
    if let Ok(v) = CimValue::parse_scalar(CimType::Sint64, n) {
        return Some(v);
    }
    CimValue::parse_scalar(CimType::Real64, n).ok()
}

/// Gives an array one element type: mixed integers become sint64 when they all fit.
fn unify_array(items: Vec<CimValue>) -> CimValue {
    let ty = items.first().map_or(CimType::String, CimValue::cim_type);
    if items.iter().all(|v| v.cim_type() == ty) {
        return CimValue::Array(ty, items);
    }
    let ints: Option<Vec<CimValue>> = items
        .iter()
        .map(|v| {
            v.as_i128()
                .and_then(|i| i64::try_from(i).ok())
                .map(CimValue::Sint64)
        })
        .collect();
    match ints {
        Some(v) => CimValue::Array(CimType::Sint64, v),
        None => CimValue::Array(
            CimType::String,
            items
                .iter()
                .map(|v| CimValue::String(v.to_xml_text()))
                .collect(),
        ),
    }
}

/// Parses one MOF instance declaration.
pub(crate) fn parse_mof_instance(text: &str) -> Result<CimInstance, MofError> {
    Parser {
        lx: Lexer { s: text, pos: 0 },
        peeked: None,
    }
    .instance()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_value_kind() {
        let i = parse_mof_instance(
            "// comment\ninstance of Msvm_X {\n Prop = \"v\\\"q\\\\\\n\"; N = 5; M = -2; B = TRUE;\n A = {\"a\", \"b\"}; D = NULL; __PATH = \"x\"; R = 1.5; /* c */ };",
        )
        .expect("valid MOF");
        assert_eq!(i.class_name, "Msvm_X");
        assert_eq!(i.value("Prop"), Some(&CimValue::String("v\"q\\\n".into())));
        assert_eq!(i.value("N"), Some(&CimValue::Uint64(5)));
        assert_eq!(i.value("M"), Some(&CimValue::Sint64(-2)));
        assert_eq!(i.value("B"), Some(&CimValue::Boolean(true)));
        assert_eq!(
            i.value("A"),
            Some(&CimValue::Array(
                CimType::String,
                vec![CimValue::String("a".into()), CimValue::String("b".into())]
            ))
        );
        assert!(i.property("D").is_some() && i.value("D").is_none());
        assert!(i.property("__PATH").is_none());
        assert_eq!(i.value("R"), Some(&CimValue::Real64(1.5)));
    }

    #[test]
    fn mixed_integer_arrays_become_signed() {
        let i = parse_mof_instance("instance of C { A = {1, -2}; };").expect("valid MOF");
        assert_eq!(
            i.value("A"),
            Some(&CimValue::Array(
                CimType::Sint64,
                vec![CimValue::Sint64(1), CimValue::Sint64(-2)]
            ))
        );
    }

    #[test]
    fn errors_carry_an_offset() {
        let e = parse_mof_instance("instance of C { P = ; };").expect_err("no value");
        assert!(e.to_string().starts_with("MOF instance at offset"), "{e}");
        assert!(parse_mof_instance("instance of C { P = \"x; };").is_err());
        assert!(parse_mof_instance("instance of C { P = 1; }; extra").is_err());
        assert!(parse_mof_instance("class C { };").is_err());
        assert!(parse_mof_instance("instance of \u{e9}t\u{e9} { \u{e9} = 1; };").is_ok());
    }
}
