//! The WQL subset the daemon answers: `SELECT * | A, B FROM Class [WHERE P = literal AND ...]`.
//! Everything else is refused with a message naming what is unsupported.

use crate::{CimInstance, CimValue};

/// A literal on the right of `=`.
#[derive(Debug, Clone, PartialEq)]
pub enum WqlLiteral {
    String(String),
    /// The literal text, e.g. `"5"` or `"-1.5"`.
    Number(String),
    Boolean(bool),
    Null,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct WqlQuery {
    pub class_name: String,
    /// `None` is `*`.
    pub properties: Option<Vec<String>>,
    /// Equality tests, all of which must hold.
    pub conditions: Vec<(String, WqlLiteral)>,
}

/// A query outside the supported subset, or malformed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum WqlError {
    #[error("the query is {0} characters long, over the limit of 65536")]
    TooLong(usize),
    #[error("{0} is not supported; only SELECT ... FROM Class [WHERE P = value AND ...] is")]
    Unsupported(String),
    #[error("expected {expected}, found {found}")]
    Expected {
        expected: &'static str,
        found: String,
    },
    #[error("the string starting at offset {0} is not terminated")]
    UnterminatedString(usize),
    #[error("unexpected character '{0}'")]
    UnexpectedChar(char),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Num(String),
    Sym(String),
}

fn describe(t: Option<&Tok>) -> String {
    match t {
        None => "the end of the query".into(),
        Some(Tok::Word(w)) | Some(Tok::Num(w)) | Some(Tok::Sym(w)) => format!("'{w}'"),
        Some(Tok::Str(s)) => format!("the string '{s}'"),
    }
}

fn read_string(chars: &[char], start: usize) -> Result<(String, usize), WqlError> {
    let q = chars[start];
    let mut out = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if i + 1 < chars.len() => {
                out.push(chars[i + 1]);
                i += 2;
            }
            c if c == q && q == '\'' && chars.get(i + 1) == Some(&'\'') => {
                out.push('\'');
                i += 2;
            }
            c if c == q => return Ok((out, i + 1)),
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Err(WqlError::UnterminatedString(start))
}

fn tokenize(query: &str) -> Result<Vec<Tok>, WqlError> {
    let chars: Vec<char> = query.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let run = |pred: &dyn Fn(char) -> bool| {
            let mut j = i + 1;
            while j < chars.len() && pred(chars[j]) {
                j += 1;
            }
            j
        };
        match c {
            c if c.is_whitespace() => i += 1,
            '\'' | '"' => {
                let (s, next) = read_string(&chars, i)?;
                toks.push(Tok::Str(s));
                i = next;
            }
            c if c.is_alphabetic() || c == '_' => {
                let j = run(&|c| c.is_alphanumeric() || c == '_');
                toks.push(Tok::Word(chars[i..j].iter().collect()));
                i = j;
            }
            c if c.is_ascii_digit() || c == '-' || c == '+' => {
                let j = run(&|c| c.is_ascii_alphanumeric() || c == '.');
                toks.push(Tok::Num(chars[i..j].iter().collect()));
                i = j;
            }
            '<' | '>' | '!' => {
                let j = run(&|c| matches!(c, '=' | '>'));
                toks.push(Tok::Sym(chars[i..j].iter().collect()));
                i = j;
            }
            '*' | ',' | '=' | '(' | ')' | '.' => {
                toks.push(Tok::Sym(c.to_string()));
                i += 1;
            }
            c => return Err(WqlError::UnexpectedChar(c)),
        }
    }
    Ok(toks)
}

const UNSUPPORTED_WORDS: [&str; 10] = [
    "OR",
    "NOT",
    "LIKE",
    "ISA",
    "JOIN",
    "ASSOCIATORS",
    "REFERENCES",
    "GROUP",
    "HAVING",
    "WITHIN",
];

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }

    fn is_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Tok::Sym(x)) if x == s)
    }

    /// Refuses an unsupported keyword or operator at the current position.
    fn refuse_unsupported(&self) -> Result<(), WqlError> {
        match self.peek() {
            Some(Tok::Word(w)) if UNSUPPORTED_WORDS.iter().any(|u| u.eq_ignore_ascii_case(w)) => {
                Err(WqlError::Unsupported(format!(
                    "the {} keyword",
                    w.to_uppercase()
                )))
            }
            Some(Tok::Sym(s)) if s != "," && s != "*" && s != "=" => {
                Err(WqlError::Unsupported(format!("the '{s}' operator")))
            }
            _ => Ok(()),
        }
    }

    fn keyword(&mut self, w: &'static str) -> Result<(), WqlError> {
        self.refuse_unsupported()?;
        if self.is_word(w) {
            self.pos += 1;
            return Ok(());
        }
        Err(WqlError::Expected {
            expected: w,
            found: describe(self.peek()),
        })
    }

    fn ident(&mut self, expected: &'static str) -> Result<String, WqlError> {
        self.refuse_unsupported()?;
        match self.next() {
            Some(Tok::Word(w)) => Ok(w),
            t => Err(WqlError::Expected {
                expected,
                found: describe(t.as_ref()),
            }),
        }
    }

    fn select_list(&mut self) -> Result<Option<Vec<String>>, WqlError> {
        if self.is_sym("*") {
            self.pos += 1;
            return Ok(None);
        }
        let mut props = vec![self.ident("a property name or '*'")?];
        while self.is_sym(",") {
            self.pos += 1;
            props.push(self.ident("a property name")?);
        }
        Ok(Some(props))
    }

    fn literal(&mut self) -> Result<WqlLiteral, WqlError> {
        self.refuse_unsupported()?;
        Ok(match self.next() {
            Some(Tok::Str(s)) => WqlLiteral::String(s),
            Some(Tok::Num(n)) => WqlLiteral::Number(n),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => WqlLiteral::Boolean(true),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => WqlLiteral::Boolean(false),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => WqlLiteral::Null,
            t => {
                return Err(WqlError::Expected {
                    expected: "a string, number, TRUE, FALSE or NULL",
                    found: describe(t.as_ref()),
                })
            }
        })
    }

    fn condition(&mut self) -> Result<(String, WqlLiteral), WqlError> {
        let prop = self.ident("a property name")?;
        self.refuse_unsupported()?;
        if self.is_word("IS") {
            self.pos += 1;
            self.keyword("NULL")?;
            return Ok((prop, WqlLiteral::Null));
        }
        match self.next() {
            Some(Tok::Sym(s)) if s == "=" => Ok((prop, self.literal()?)),
            t => Err(WqlError::Expected {
                expected: "'='",
                found: describe(t.as_ref()),
            }),
        }
    }

    fn query(&mut self) -> Result<WqlQuery, WqlError> {
        self.keyword("SELECT")?;
        let properties = self.select_list()?;
        self.keyword("FROM")?;
        let class_name = self.ident("a class name")?;
        if self.is_sym(",") {
            return Err(WqlError::Unsupported("a join of several classes".into()));
        }
        let mut conditions = Vec::new();
        if self.peek().is_some() {
            self.keyword("WHERE")?;
            conditions.push(self.condition()?);
            while self.peek().is_some() {
                self.keyword("AND")?;
                conditions.push(self.condition()?);
            }
        }
        Ok(WqlQuery {
            class_name,
            properties,
            conditions,
        })
    }
}

/// Parses a query in the supported subset.
pub fn parse_wql(query: &str) -> Result<WqlQuery, WqlError> {
    if query.len() > 65_536 {
        return Err(WqlError::TooLong(query.len()));
    }
    let first = query.split_whitespace().next().unwrap_or("");
    if first.eq_ignore_ascii_case("ASSOCIATORS") || first.eq_ignore_ascii_case("REFERENCES") {
        return Err(WqlError::Unsupported(
            "ASSOCIATORS OF / REFERENCES OF queries".into(),
        ));
    }
    let toks = tokenize(query)?;
    Parser { toks, pos: 0 }.query()
}

fn number_matches(literal: &str, value: &CimValue) -> bool {
    if let (Some(v), Ok(l)) = (value.as_i128(), literal.parse::<i128>()) {
        return v == l;
    }
    let as_f64 = match value {
        CimValue::Real32(f) => Some(f64::from(*f)),
        CimValue::Real64(f) => Some(*f),
        v => v.as_i128().map(|i| i as f64),
    };
    match (as_f64, literal.parse::<f64>()) {
        (Some(v), Ok(l)) => v == l,
        _ => value.to_xml_text() == literal,
    }
}

fn literal_matches(literal: &WqlLiteral, value: Option<&CimValue>) -> bool {
    let Some(value) = value else {
        return *literal == WqlLiteral::Null;
    };
    match literal {
        WqlLiteral::Null => false,
        WqlLiteral::Boolean(b) => value.as_bool() == Some(*b),
        WqlLiteral::Number(n) => number_matches(n, value),
        WqlLiteral::String(s) => match value {
            CimValue::Array(..) => false,
            v if v.cim_type().is_integer() => number_matches(s.trim(), v),
            CimValue::Boolean(b) => s.eq_ignore_ascii_case(if *b { "true" } else { "false" }),
            v => v.to_xml_text().to_lowercase() == s.to_lowercase(),
        },
    }
}

impl WqlQuery {
    /// True when the instance is of the queried class and every condition holds. Strings
    /// compare ignoring case, as WMI does; numbers compare by value; NULL matches a NULL or
    /// absent property.
    pub fn matches(&self, inst: &CimInstance) -> bool {
        self.conditions
            .iter()
            .all(|(prop, lit)| literal_matches(lit, inst.value(prop)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_supported_forms() {
        let q = parse_wql("select * from Msvm_ComputerSystem").expect("valid");
        assert_eq!(q.class_name, "Msvm_ComputerSystem");
        assert_eq!(q.properties, None);
        let q = parse_wql(
            r#"SELECT Name, ElementName FROM Msvm_ComputerSystem WHERE ElementName = 'it''s' AND Caption = "a\"b" AND N = 5 AND B = TRUE AND D IS NULL"#,
        )
        .expect("valid");
        assert_eq!(
            q.properties,
            Some(vec!["Name".into(), "ElementName".into()])
        );
        assert_eq!(
            q.conditions,
            vec![
                ("ElementName".into(), WqlLiteral::String("it's".into())),
                ("Caption".into(), WqlLiteral::String("a\"b".into())),
                ("N".into(), WqlLiteral::Number("5".into())),
                ("B".into(), WqlLiteral::Boolean(true)),
                ("D".into(), WqlLiteral::Null),
            ]
        );
        let q = parse_wql(r"SELECT * FROM C WHERE P = 'a\'b'").expect("valid");
        assert_eq!(q.conditions[0].1, WqlLiteral::String("a'b".into()));
    }

    #[test]
    fn refuses_the_rest_by_name() {
        let msg = |q: &str| parse_wql(q).expect_err("unsupported").to_string();
        assert!(msg("SELECT * FROM C WHERE A = 1 OR B = 2").contains("OR keyword"));
        assert!(msg("SELECT * FROM C WHERE A < 1").contains("'<' operator"));
        assert!(msg("SELECT * FROM C WHERE A LIKE 'x%'").contains("LIKE keyword"));
        assert!(msg("SELECT * FROM A, B").contains("join"));
        assert!(msg("ASSOCIATORS OF {C.K='v'}").contains("ASSOCIATORS OF"));
        assert!(msg("SELECT * FROM C WHERE A <> 1").contains("'<>' operator"));
        assert!(matches!(
            parse_wql("SELECT * FROM C WHERE A = 'x"),
            Err(WqlError::UnterminatedString(_))
        ));
        assert!(matches!(
            parse_wql("SELECT FROM C"),
            Err(WqlError::Expected { .. })
        ));
    }

    #[test]
    fn matching_follows_wmi_rules() {
        let inst = CimInstance::new("Msvm_ComputerSystem")
            .with("ElementName", CimValue::String("MyVM".into()))
            .with("EnabledState", CimValue::Uint16(2))
            .with("Flag", CimValue::Boolean(false));
        let m = |q: &str| parse_wql(q).expect("valid").matches(&inst);
        assert!(m("SELECT * FROM C WHERE ElementName = 'myvm'"));
        assert!(m("SELECT * FROM C WHERE EnabledState = 2 AND Flag = FALSE"));
        assert!(m("SELECT * FROM C WHERE EnabledState = '2'"));
        assert!(m("SELECT * FROM C WHERE Missing = NULL"));
        assert!(!m("SELECT * FROM C WHERE EnabledState = 3"));
        assert!(!m("SELECT * FROM C WHERE Missing = 'x'"));
        assert!(!m("SELECT * FROM C WHERE ElementName IS NULL"));
    }

    fn render_literal(l: &WqlLiteral) -> String {
        match l {
            WqlLiteral::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''")),
            WqlLiteral::Number(n) => n.clone(),
            WqlLiteral::Boolean(b) => if *b { "TRUE" } else { "false" }.into(),
            WqlLiteral::Null => "NULL".into(),
        }
    }

    fn render(q: &WqlQuery) -> String {
        let props = q
            .properties
            .as_ref()
            .map_or("*".to_string(), |p| p.join(", "));
        let mut s = format!("SELECT {props} FROM {}", q.class_name);
        for (i, (p, l)) in q.conditions.iter().enumerate() {
            s.push_str(if i == 0 { " WHERE " } else { " and " });
            s.push_str(&format!("{p} = {}", render_literal(l)));
        }
        s
    }

    fn ident() -> impl Strategy<Value = String> {
        "[A-Za-z_][A-Za-z0-9_]{0,12}".prop_filter("not a keyword", |s| {
            ![
                "select", "from", "where", "and", "is", "true", "false", "null",
            ]
            .iter()
            .chain(UNSUPPORTED_WORDS.iter())
            .any(|k| k.eq_ignore_ascii_case(s))
        })
    }

    fn literal() -> impl Strategy<Value = WqlLiteral> {
        prop_oneof![
            any::<String>().prop_map(WqlLiteral::String),
            any::<i64>().prop_map(|n| WqlLiteral::Number(n.to_string())),
            any::<bool>().prop_map(WqlLiteral::Boolean),
            Just(WqlLiteral::Null),
        ]
    }

    proptest! {
        #[test]
        fn render_then_parse_round_trips(
            class_name in ident(),
            properties in proptest::option::of(proptest::collection::vec(ident(), 1..4)),
            conditions in proptest::collection::vec((ident(), literal()), 0..4),
        ) {
            let q = WqlQuery { class_name, properties, conditions };
            prop_assert_eq!(parse_wql(&render(&q)), Ok(q));
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = parse_wql(&s);
        }
    }
}
