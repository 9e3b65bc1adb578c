//! CIM instances: a class name and its (possibly NULL) property values.

use crate::{CimType, CimValue};

/// One property of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct CimProperty {
    pub name: String,
    pub ty: CimType,
    pub is_array: bool,
    /// `None` is NULL.
    pub value: Option<CimValue>,
    /// `Some("instance")` when the property carries `EmbeddedObject="instance"`.
    pub embedded_object: Option<String>,
    /// `REFERENCECLASS` of a reference property.
    pub reference_class: Option<String>,
}

/// An instance of a CIM class.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CimInstance {
    pub class_name: String,
    pub properties: Vec<CimProperty>,
}

impl CimProperty {
    fn new(name: &str, ty: CimType, is_array: bool, value: Option<CimValue>) -> Self {
        CimProperty {
            name: name.to_string(),
            ty,
            is_array,
            value,
            embedded_object: None,
            reference_class: None,
        }
    }
}

impl CimInstance {
    pub fn new(class_name: &str) -> Self {
        CimInstance {
            class_name: class_name.to_string(),
            properties: Vec::new(),
        }
    }

    /// The property named `name`, ignoring case.
    pub fn property(&self, name: &str) -> Option<&CimProperty> {
        self.properties
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// The value of `name`; `None` when the property is absent or NULL.
    pub fn value(&self, name: &str) -> Option<&CimValue> {
        self.property(name)?.value.as_ref()
    }

    /// Replaces the property's value (keeping its other attributes) or appends a new property.
    pub fn set(&mut self, name: &str, value: CimValue) {
        let (ty, is_array) = (value.cim_type(), value.is_array());
        self.put(CimProperty::new(name, ty, is_array, Some(value)));
    }

    pub fn set_null(&mut self, name: &str, ty: CimType, is_array: bool) {
        self.put(CimProperty::new(name, ty, is_array, None));
    }

    pub fn with(mut self, name: &str, value: CimValue) -> Self {
        self.set(name, value);
        self
    }

    /// Inserts or replaces a whole property (used by the decoders).
    pub(crate) fn put(&mut self, prop: CimProperty) {
        match self
            .properties
            .iter_mut()
            .find(|p| p.name.eq_ignore_ascii_case(&prop.name))
        {
            Some(existing) => {
                existing.ty = prop.ty;
                existing.is_array = prop.is_array;
                existing.value = prop.value;
            }
            None => self.properties.push(prop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_case_insensitively() {
        let mut i = CimInstance::new("Msvm_X").with("Name", CimValue::String("a".into()));
        i.set("NAME", CimValue::Uint16(3));
        assert_eq!(i.properties.len(), 1);
        assert_eq!(i.properties[0].name, "Name");
        assert_eq!(i.value("name"), Some(&CimValue::Uint16(3)));
        assert_eq!(i.property("name").map(|p| p.ty), Some(CimType::Uint16));
    }

    #[test]
    fn null_and_absent_have_no_value() {
        let mut i = CimInstance::new("Msvm_X");
        i.set_null("Thumb", CimType::String, false);
        assert!(i.property("Thumb").is_some());
        assert_eq!(i.value("Thumb"), None);
        assert_eq!(i.value("Missing"), None);
    }

    #[test]
    fn arrays_record_their_element_type() {
        let i = CimInstance::new("C").with(
            "A",
            CimValue::Array(CimType::String, vec![CimValue::String("x".into())]),
        );
        let p = i.property("A").expect("set above");
        assert!(p.is_array);
        assert_eq!(p.ty, CimType::String);
    }
}
