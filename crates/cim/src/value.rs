//! CIM data types and typed values (DSP0004), with the text form used inside a CIM-XML `<VALUE>`.

use crate::{CimDateTime, ObjectPath};

/// A CIM intrinsic data type (the `TYPE` / `PARAMTYPE` attribute of CIM-XML).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CimType {
    Boolean,
    String,
    Char16,
    Uint8,
    Sint8,
    Uint16,
    Sint16,
    Uint32,
    Sint32,
    Uint64,
    Sint64,
    Real32,
    Real64,
    Datetime,
    Reference,
}

const ALL_TYPES: [CimType; 15] = [
    CimType::Boolean,
    CimType::String,
    CimType::Char16,
    CimType::Uint8,
    CimType::Sint8,
    CimType::Uint16,
    CimType::Sint16,
    CimType::Uint32,
    CimType::Sint32,
    CimType::Uint64,
    CimType::Sint64,
    CimType::Real32,
    CimType::Real64,
    CimType::Datetime,
    CimType::Reference,
];

impl CimType {
    /// The DSP0201 spelling, e.g. `"uint16"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CimType::Boolean => "boolean",
            CimType::String => "string",
            CimType::Char16 => "char16",
            CimType::Uint8 => "uint8",
            CimType::Sint8 => "sint8",
            CimType::Uint16 => "uint16",
            CimType::Sint16 => "sint16",
            CimType::Uint32 => "uint32",
            CimType::Sint32 => "sint32",
            CimType::Uint64 => "uint64",
            CimType::Sint64 => "sint64",
            CimType::Real32 => "real32",
            CimType::Real64 => "real64",
            CimType::Datetime => "datetime",
            CimType::Reference => "reference",
        }
    }

    /// Parses a type name, ignoring case.
    pub fn parse(s: &str) -> Option<CimType> {
        ALL_TYPES
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// True for the eight integer types.
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            CimType::Uint8
                | CimType::Sint8
                | CimType::Uint16
                | CimType::Sint16
                | CimType::Uint32
                | CimType::Sint32
                | CimType::Uint64
                | CimType::Sint64
        )
    }
}

/// A typed CIM value. NULL is represented outside this type (as `Option<CimValue>`).
#[derive(Debug, Clone, PartialEq)]
pub enum CimValue {
    Boolean(bool),
    String(String),
    Char16(char),
    Uint8(u8),
    Sint8(i8),
    Uint16(u16),
    Sint16(i16),
    Uint32(u32),
    Sint32(i32),
    Uint64(u64),
    Sint64(i64),
    Real32(f32),
    Real64(f64),
    Datetime(CimDateTime),
    Reference(ObjectPath),
    /// An array; the type is the element type.
    Array(CimType, Vec<CimValue>),
}

/// A `<VALUE>` text that does not fit the declared type.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ValueError {
    #[error("'{text}' is not a valid {ty}")]
    Invalid { ty: &'static str, text: String },
    #[error("'{text}' is out of range for {ty}")]
    OutOfRange { ty: &'static str, text: String },
}

fn invalid(ty: CimType, text: &str) -> ValueError {
    ValueError::Invalid {
        ty: ty.as_str(),
        text: text.to_string(),
    }
}

/// Parses a DSP0201 integer (decimal, or `0x` hex with an optional sign) into an i128.
fn parse_integer(ty: CimType, text: &str) -> Result<i128, ValueError> {
    let t = text.trim();
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = match body.get(..2) {
        Some(p) if p.eq_ignore_ascii_case("0x") => (16, &body[2..]),
        _ => (10, body),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid(ty, text));
    }
    let magnitude = u128::from_str_radix(digits, radix).map_err(|_| ValueError::OutOfRange {
        ty: ty.as_str(),
        text: text.to_string(),
    })?;
    let magnitude = i128::try_from(magnitude).map_err(|_| ValueError::OutOfRange {
        ty: ty.as_str(),
        text: text.to_string(),
    })?;
    Ok(if neg { -magnitude } else { magnitude })
}

fn narrow<T: TryFrom<i128>>(ty: CimType, text: &str) -> Result<T, ValueError> {
    T::try_from(parse_integer(ty, text)?).map_err(|_| ValueError::OutOfRange {
        ty: ty.as_str(),
        text: text.to_string(),
    })
}

fn parse_real(ty: CimType, text: &str) -> Result<f64, ValueError> {
    let t = text.trim();
    match t.to_ascii_uppercase().as_str() {
        "NAN" => Ok(f64::NAN),
        "INF" | "+INF" => Ok(f64::INFINITY),
        "-INF" => Ok(f64::NEG_INFINITY),
        _ if t
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            Err(invalid(ty, text))
        }
        _ => t.parse::<f64>().map_err(|_| invalid(ty, text)),
    }
}

fn real_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "INF" } else { "-INF" }.into()
    } else {
        format!("{v:?}")
    }
}

impl CimValue {
    /// The type of the value; the element type for arrays.
    pub fn cim_type(&self) -> CimType {
        match self {
            CimValue::Boolean(_) => CimType::Boolean,
            CimValue::String(_) => CimType::String,
            CimValue::Char16(_) => CimType::Char16,
            CimValue::Uint8(_) => CimType::Uint8,
            CimValue::Sint8(_) => CimType::Sint8,
            CimValue::Uint16(_) => CimType::Uint16,
            CimValue::Sint16(_) => CimType::Sint16,
            CimValue::Uint32(_) => CimType::Uint32,
            CimValue::Sint32(_) => CimType::Sint32,
            CimValue::Uint64(_) => CimType::Uint64,
            CimValue::Sint64(_) => CimType::Sint64,
            CimValue::Real32(_) => CimType::Real32,
            CimValue::Real64(_) => CimType::Real64,
            CimValue::Datetime(_) => CimType::Datetime,
            CimValue::Reference(_) => CimType::Reference,
            CimValue::Array(t, _) => *t,
        }
    }

    pub fn is_array(&self) -> bool {
        matches!(self, CimValue::Array(..))
    }

    /// Parses the text of a CIM-XML `<VALUE>` as `ty`.
    pub fn parse_scalar(ty: CimType, text: &str) -> Result<CimValue, ValueError> {
        Ok(match ty {
            CimType::Boolean => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => CimValue::Boolean(true),
                "false" | "0" => CimValue::Boolean(false),
                _ => return Err(invalid(ty, text)),
            },
            CimType::String => CimValue::String(text.to_string()),
            CimType::Char16 => {
                let mut chars = text.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => CimValue::Char16(c),
                    _ => return Err(invalid(ty, text)),
                }
            }
            CimType::Uint8 => CimValue::Uint8(narrow(ty, text)?),
            CimType::Sint8 => CimValue::Sint8(narrow(ty, text)?),
            CimType::Uint16 => CimValue::Uint16(narrow(ty, text)?),
            CimType::Sint16 => CimValue::Sint16(narrow(ty, text)?),
            CimType::Uint32 => CimValue::Uint32(narrow(ty, text)?),
            CimType::Sint32 => CimValue::Sint32(narrow(ty, text)?),
            CimType::Uint64 => CimValue::Uint64(narrow(ty, text)?),
            CimType::Sint64 => CimValue::Sint64(narrow(ty, text)?),
            CimType::Real32 => CimValue::Real32(parse_real(ty, text)? as f32),
            CimType::Real64 => CimValue::Real64(parse_real(ty, text)?),
            CimType::Datetime => {
                CimValue::Datetime(CimDateTime::parse(text.trim()).map_err(|_| invalid(ty, text))?)
            }
            CimType::Reference => CimValue::Reference(
                ObjectPath::parse_wmi(text.trim()).map_err(|_| invalid(ty, text))?,
            ),
        })
    }

    /// The unescaped text that goes inside `<VALUE>`; empty for arrays.
    pub fn to_xml_text(&self) -> String {
        match self {
            CimValue::Boolean(b) => if *b { "TRUE" } else { "FALSE" }.to_string(),
            CimValue::String(s) => s.clone(),
            CimValue::Char16(c) => c.to_string(),
            CimValue::Uint8(v) => v.to_string(),
            CimValue::Sint8(v) => v.to_string(),
            CimValue::Uint16(v) => v.to_string(),
            CimValue::Sint16(v) => v.to_string(),
            CimValue::Uint32(v) => v.to_string(),
            CimValue::Sint32(v) => v.to_string(),
            CimValue::Uint64(v) => v.to_string(),
            CimValue::Sint64(v) => v.to_string(),
            CimValue::Real32(v) => real_text(f64::from(*v)),
            CimValue::Real64(v) => real_text(*v),
            CimValue::Datetime(d) => d.to_string(),
            CimValue::Reference(p) => p.to_wmi(),
            CimValue::Array(..) => String::new(),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            CimValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any unsigned integer, or a signed one that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            CimValue::Uint8(v) => Some(v.into()),
            CimValue::Uint16(v) => Some(v.into()),
            CimValue::Uint32(v) => Some(v.into()),
            CimValue::Uint64(v) => Some(v),
            CimValue::Sint8(v) => u64::try_from(v).ok(),
            CimValue::Sint16(v) => u64::try_from(v).ok(),
            CimValue::Sint32(v) => u64::try_from(v).ok(),
            CimValue::Sint64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer, widened (used for numeric comparisons).
    pub(crate) fn as_i128(&self) -> Option<i128> {
        match *self {
            CimValue::Sint8(v) => Some(v.into()),
            CimValue::Sint16(v) => Some(v.into()),
            CimValue::Sint32(v) => Some(v.into()),
            CimValue::Sint64(v) => Some(v.into()),
            _ => self.as_u64().map(i128::from),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            CimValue::Boolean(b) => Some(*b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_round_trip_case_insensitively() {
        for t in ALL_TYPES {
            assert_eq!(CimType::parse(&t.as_str().to_uppercase()), Some(t));
        }
        assert_eq!(CimType::parse("uint128"), None);
    }

    #[test]
    fn booleans_accept_words_and_digits() {
        assert_eq!(
            CimValue::parse_scalar(CimType::Boolean, "true"),
            Ok(CimValue::Boolean(true))
        );
        assert_eq!(
            CimValue::parse_scalar(CimType::Boolean, "0"),
            Ok(CimValue::Boolean(false))
        );
        assert!(CimValue::parse_scalar(CimType::Boolean, "yes").is_err());
    }

    #[test]
    fn integers_are_range_checked() {
        assert_eq!(
            CimValue::parse_scalar(CimType::Uint16, "65535"),
            Ok(CimValue::Uint16(65535))
        );
        assert_eq!(
            CimValue::parse_scalar(CimType::Uint16, "0x10"),
            Ok(CimValue::Uint16(16))
        );
        assert_eq!(
            CimValue::parse_scalar(CimType::Sint8, "-128"),
            Ok(CimValue::Sint8(-128))
        );
        assert!(matches!(
            CimValue::parse_scalar(CimType::Uint16, "65536"),
            Err(ValueError::OutOfRange { .. })
        ));
        assert!(CimValue::parse_scalar(CimType::Uint8, "-1").is_err());
        let err = CimValue::parse_scalar(CimType::Uint16, "60x").expect_err("bad digits");
        assert_eq!(err.to_string(), "'60x' is not a valid uint16");
    }

    #[test]
    fn reals_and_special_values() {
        assert_eq!(
            CimValue::parse_scalar(CimType::Real64, "1.5e3"),
            Ok(CimValue::Real64(1500.0))
        );
        assert_eq!(CimValue::Real64(f64::INFINITY).to_xml_text(), "INF");
        assert!(CimValue::parse_scalar(CimType::Real32, "abc").is_err());
    }

    #[test]
    fn text_forms() {
        assert_eq!(CimValue::Boolean(false).to_xml_text(), "FALSE");
        assert_eq!(CimValue::Sint32(-7).to_xml_text(), "-7");
        assert_eq!(
            CimValue::Array(CimType::String, vec![]).to_xml_text(),
            String::new()
        );
        assert_eq!(CimValue::Sint16(5).as_u64(), Some(5));
        assert_eq!(CimValue::Sint16(-5).as_u64(), None);
    }
}
