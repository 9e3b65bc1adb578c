//! CIM class declarations, as returned by GetClass / EnumerateClasses.
//! (wbemcli and pywbemcli call GetClass before every method call.)

use crate::{CimType, CimValue};

/// A qualifier such as `Key`, `In`, `Out` or `EmbeddedInstance("Msvm_X")`.
#[derive(Debug, Clone, PartialEq)]
pub struct Qualifier {
    pub name: String,
    pub ty: CimType,
    pub value: CimValue,
}

/// A property declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyDecl {
    pub name: String,
    pub ty: CimType,
    pub is_array: bool,
    /// Set for `PROPERTY.REFERENCE`.
    pub reference_class: Option<String>,
    pub qualifiers: Vec<Qualifier>,
    pub class_origin: Option<String>,
    pub propagated: bool,
}

/// A method parameter declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    pub name: String,
    pub ty: CimType,
    pub is_array: bool,
    pub reference_class: Option<String>,
    pub qualifiers: Vec<Qualifier>,
}

/// A method declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodDecl {
    pub name: String,
    pub return_type: CimType,
    pub params: Vec<ParamDecl>,
    pub qualifiers: Vec<Qualifier>,
    pub class_origin: Option<String>,
    pub propagated: bool,
}

/// A class declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct CimClass {
    pub name: String,
    pub superclass: Option<String>,
    pub qualifiers: Vec<Qualifier>,
    pub properties: Vec<PropertyDecl>,
    pub methods: Vec<MethodDecl>,
}

impl Qualifier {
    /// A boolean qualifier set to TRUE, e.g. `Key`.
    pub fn boolean(name: &str) -> Self {
        Qualifier {
            name: name.to_string(),
            ty: CimType::Boolean,
            value: CimValue::Boolean(true),
        }
    }

    pub fn string(name: &str, v: &str) -> Self {
        Qualifier {
            name: name.to_string(),
            ty: CimType::String,
            value: CimValue::String(v.to_string()),
        }
    }
}

/// True when `qualifiers` holds `name` with a value other than FALSE.
fn has_flag(qualifiers: &[Qualifier], name: &str) -> bool {
    qualifiers
        .iter()
        .any(|q| q.name.eq_ignore_ascii_case(name) && q.value.as_bool() != Some(false))
}

impl CimClass {
    pub fn property(&self, name: &str) -> Option<&PropertyDecl> {
        self.properties
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    pub fn method(&self, name: &str) -> Option<&MethodDecl> {
        self.methods
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
    }

    /// Names of the properties qualified `Key`, in declaration order.
    pub fn key_names(&self) -> Vec<&str> {
        self.properties
            .iter()
            .filter(|p| has_flag(&p.qualifiers, "Key"))
            .map(|p| p.name.as_str())
            .collect()
    }
}

impl MethodDecl {
    pub fn param(&self, name: &str) -> Option<&ParamDecl> {
        self.params
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }
}

impl ParamDecl {
    /// Qualified `In`. Parameters with neither `In` nor `Out` are input (the DSP0004 default).
    pub fn is_in(&self) -> bool {
        has_flag(&self.qualifiers, "In") || !self.is_out()
    }

    pub fn is_out(&self) -> bool {
        has_flag(&self.qualifiers, "Out")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &str, qualifiers: Vec<Qualifier>) -> ParamDecl {
        ParamDecl {
            name: name.into(),
            ty: CimType::String,
            is_array: false,
            reference_class: None,
            qualifiers,
        }
    }

    #[test]
    fn in_out_flags() {
        assert!(param("A", vec![Qualifier::boolean("In")]).is_in());
        assert!(!param("A", vec![Qualifier::boolean("Out")]).is_in());
        assert!(param("A", vec![Qualifier::boolean("OUT")]).is_out());
        assert!(param("A", vec![]).is_in());
        let both = param(
            "A",
            vec![Qualifier::boolean("In"), Qualifier::boolean("Out")],
        );
        assert!(both.is_in() && both.is_out());
    }

    #[test]
    fn lookups_and_keys() {
        let prop = |name: &str, key: bool| PropertyDecl {
            name: name.into(),
            ty: CimType::String,
            is_array: false,
            reference_class: None,
            qualifiers: if key {
                vec![Qualifier::boolean("Key")]
            } else {
                vec![]
            },
            class_origin: None,
            propagated: false,
        };
        let c = CimClass {
            name: "Msvm_ReplicationService".into(),
            superclass: None,
            qualifiers: vec![],
            properties: vec![
                prop("CreationClassName", true),
                prop("Caption", false),
                prop("Name", true),
            ],
            methods: vec![MethodDecl {
                name: "InitiateFailback".into(),
                return_type: CimType::Uint32,
                params: vec![param(
                    "RecoveryPointIdentifier",
                    vec![Qualifier::boolean("In")],
                )],
                qualifiers: vec![],
                class_origin: None,
                propagated: false,
            }],
        };
        assert_eq!(c.key_names(), vec!["CreationClassName", "Name"]);
        assert!(c.property("caption").is_some());
        let m = c.method("initiatefailback").expect("declared");
        assert!(m.param("RECOVERYPOINTIDENTIFIER").is_some());
    }
}
