//! Intrinsic operations (DSP0200 §5.3): GetClass, EnumerateClasses, EnumerateClassNames, GetInstance,
//! EnumerateInstances, EnumerateInstanceNames, Associators, AssociatorNames, References,
//! ReferenceNames and ExecQuery (WQL subset). Everything else answers CIM_ERR_NOT_SUPPORTED.

use cim::{
    CimClass, CimError, CimInstance, CimStatusCode, IReturn, KeyValue, ObjectPath, ParamData,
    ParamValue,
};

use super::objects::{associations, instances_of, Object, Snapshot};
use super::schema;

/// Read-only view the operations work on: the snapshot plus the health function.
pub struct View<'a> {
    pub snap: &'a Snapshot,
    pub health: &'a dyn Fn(&crate::store::VmRow, Option<&crate::store::RelationshipRow>) -> u16,
}

fn param<'a>(params: &'a [ParamValue], name: &str) -> Option<&'a ParamValue> {
    params.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

fn flag(params: &[ParamValue], name: &str, default: bool) -> bool {
    param(params, name)
        .and_then(ParamValue::as_bool)
        .unwrap_or(default)
}

fn opt_str<'a>(params: &'a [ParamValue], name: &str) -> Option<&'a str> {
    param(params, name).and_then(|p| match &p.data {
        ParamData::ClassName(c) => Some(c.as_str()),
        _ => p.as_str(),
    })
}

fn invalid(msg: impl Into<String>) -> CimError {
    CimError::new(CimStatusCode::InvalidParameter, msg)
}

fn class_param(params: &[ParamValue]) -> Result<&'static CimClass, CimError> {
    let name = opt_str(params, "ClassName")
        .ok_or_else(|| invalid("the ClassName parameter is required"))?;
    schema::class(name).ok_or_else(|| {
        CimError::new(
            CimStatusCode::InvalidClass,
            format!("no class '{name}' in this namespace"),
        )
    })
}

fn object_name(params: &[ParamValue], name: &str) -> Result<ObjectPath, CimError> {
    match param(params, name).map(|p| &p.data) {
        Some(ParamData::InstanceName(p)) | Some(ParamData::Reference(p)) => Ok(p.clone()),
        Some(ParamData::ClassName(c)) => Err(CimError::new(
            CimStatusCode::NotSupported,
            format!(
                "{name} names the class '{c}'; class-level association queries are not supported"
            ),
        )),
        _ => Err(invalid(format!(
            "the {name} parameter (an instance name) is required"
        ))),
    }
}

/// The requested PropertyList, if any (None = all properties).
fn property_list(params: &[ParamValue]) -> Option<Vec<String>> {
    match param(params, "PropertyList").map(|p| &p.data) {
        Some(ParamData::ValueArray(items)) => Some(items.iter().flatten().cloned().collect()),
        _ => None,
    }
}

fn filter_properties(mut inst: CimInstance, list: &Option<Vec<String>>) -> CimInstance {
    if let Some(list) = list {
        inst.properties
            .retain(|p| list.iter().any(|n| n.eq_ignore_ascii_case(&p.name)));
    }
    inst
}

/// The class as GetClass returns it, honouring IncludeQualifiers and IncludeClassOrigin.
fn class_view(class: &CimClass, qualifiers: bool, origin: bool) -> CimClass {
    let mut c = class.clone();
    if !qualifiers {
        c.qualifiers.clear();
        c.properties.iter_mut().for_each(|p| p.qualifiers.clear());
        c.methods.iter_mut().for_each(|m| {
            m.qualifiers.clear();
            m.params.iter_mut().for_each(|p| p.qualifiers.clear());
        });
    }
    if origin {
        c.properties
            .iter_mut()
            .for_each(|p| p.class_origin = Some(class.name.clone()));
        c.methods
            .iter_mut()
            .for_each(|m| m.class_origin = Some(class.name.clone()));
    }
    c
}

impl View<'_> {
    /// All instances of `class` and of the classes derived from it.
    fn instances(&self, class: &str) -> Vec<Object> {
        schema::classes()
            .iter()
            .filter(|c| schema::is_a(&c.name, class))
            .flat_map(|c| instances_of(self.snap, &c.name, self.health))
            .collect()
    }

    fn get(&self, path: &ObjectPath) -> Result<Object, CimError> {
        if schema::class(&path.class_name).is_none() {
            return Err(CimError::new(
                CimStatusCode::InvalidClass,
                format!("no class '{}'", path.class_name),
            ));
        }
        self.instances(&path.class_name)
            .into_iter()
            .find(|(p, _)| p.same_instance(path))
            .ok_or_else(|| {
                CimError::new(
                    CimStatusCode::NotFound,
                    format!("no instance {}", path.to_wmi()),
                )
            })
    }

    /// The association instances that reference `path`, with the far end: (assoc, near role, far role, far path).
    fn links(&self, path: &ObjectPath) -> Vec<(Object, String, String, ObjectPath)> {
        let mut out = Vec::new();
        for assoc in associations(self.snap) {
            let Some((r1, r2)) = schema::association_roles(&assoc.0.class_name) else {
                continue;
            };
            let end = |role: &str| match assoc.0.key(role) {
                Some(KeyValue::Reference(p)) => Some((**p).clone()),
                _ => None,
            };
            let (Some(p1), Some(p2)) = (end(r1), end(r2)) else {
                continue;
            };
            if p1.same_instance(path) {
                out.push((assoc.clone(), r1.to_string(), r2.to_string(), p2.clone()));
            }
            if p2.same_instance(path) {
                out.push((assoc.clone(), r2.to_string(), r1.to_string(), p1));
            }
        }
        out
    }

    fn associators(&self, params: &[ParamValue]) -> Result<Vec<Object>, CimError> {
        let path = object_name(params, "ObjectName")?;
        self.get(&path)?;
        let assoc_class = opt_str(params, "AssocClass");
        let result_class = opt_str(params, "ResultClass");
        let role = opt_str(params, "Role");
        let result_role = opt_str(params, "ResultRole");
        let props = property_list(params);
        let mut out: Vec<Object> = Vec::new();
        for ((apath, _), near, far, far_path) in self.links(&path) {
            let keep = assoc_class.is_none_or(|c| schema::is_a(&apath.class_name, c))
                && result_class.is_none_or(|c| schema::is_a(&far_path.class_name, c))
                && role.is_none_or(|r| r.eq_ignore_ascii_case(&near))
                && result_role.is_none_or(|r| r.eq_ignore_ascii_case(&far));
            if keep && !out.iter().any(|(p, _)| p.same_instance(&far_path)) {
                if let Ok((p, inst)) = self.get(&far_path) {
                    out.push((p, filter_properties(inst, &props)));
                }
            }
        }
        Ok(out)
    }

    fn references(&self, params: &[ParamValue]) -> Result<Vec<Object>, CimError> {
        let path = object_name(params, "ObjectName")?;
        self.get(&path)?;
        let result_class = opt_str(params, "ResultClass");
        let role = opt_str(params, "Role");
        Ok(self
            .links(&path)
            .into_iter()
            .filter(|((apath, _), near, _, _)| {
                result_class.is_none_or(|c| schema::is_a(&apath.class_name, c))
                    && role.is_none_or(|r| r.eq_ignore_ascii_case(near))
            })
            .map(|(assoc, _, _, _)| assoc)
            .collect())
    }

    fn exec_query(&self, params: &[ParamValue]) -> Result<Vec<Object>, CimError> {
        let lang = opt_str(params, "QueryLanguage").unwrap_or("WQL");
        if !lang.eq_ignore_ascii_case("WQL") {
            return Err(CimError::new(
                CimStatusCode::QueryLanguageNotSupported,
                format!("query language '{lang}' is not supported; use WQL"),
            ));
        }
        let text =
            opt_str(params, "Query").ok_or_else(|| invalid("the Query parameter is required"))?;
        let query = cim::parse_wql(text)
            .map_err(|e| CimError::new(CimStatusCode::InvalidQuery, e.to_string()))?;
        if schema::class(&query.class_name).is_none() {
            return Err(CimError::new(
                CimStatusCode::InvalidClass,
                format!("no class '{}'", query.class_name),
            ));
        }
        let props = query.properties.clone();
        Ok(self
            .instances(&query.class_name)
            .into_iter()
            .filter(|(_, inst)| query.matches(inst))
            .map(|(p, inst)| (p, filter_properties(inst, &props)))
            .collect())
    }

    /// Runs one intrinsic operation.
    pub fn run(&self, method: &str, params: &[ParamValue]) -> Result<IReturn, CimError> {
        match method.to_ascii_lowercase().as_str() {
            "getclass" => {
                // DSP0200: GetClass of a class the namespace lacks is CIM_ERR_NOT_FOUND.
                let class = class_param(params).map_err(|e| {
                    if e.code == CimStatusCode::InvalidClass {
                        CimError::new(CimStatusCode::NotFound, e.description)
                    } else {
                        e
                    }
                })?;
                let view = class_view(class, flag(params, "IncludeQualifiers", true), flag(params, "IncludeClassOrigin", false));
                Ok(IReturn::Class(view))
            }
            "enumerateclasses" | "enumerateclassnames" => {
                let base = opt_str(params, "ClassName");
                if let Some(b) = base {
                    if schema::class(b).is_none() {
                        return Err(CimError::new(CimStatusCode::InvalidClass, format!("no class '{b}'")));
                    }
                }
                let chosen: Vec<&CimClass> = schema::classes()
                    .iter()
                    .filter(|c| base.is_none_or(|b| c.superclass.as_deref().is_some_and(|s| s.eq_ignore_ascii_case(b))))
                    .collect();
                if method.eq_ignore_ascii_case("EnumerateClassNames") {
                    return Ok(IReturn::ClassNames(chosen.iter().map(|c| c.name.clone()).collect()));
                }
                let q = flag(params, "IncludeQualifiers", true);
                let o = flag(params, "IncludeClassOrigin", false);
                Ok(IReturn::Classes(chosen.iter().map(|c| class_view(c, q, o)).collect()))
            }
            "getinstance" => {
                let path = object_name(params, "InstanceName")?;
                let (_, inst) = self.get(&path)?;
                Ok(IReturn::Instance(filter_properties(inst, &property_list(params))))
            }
            "enumerateinstances" => {
                let class = class_param(params)?;
                let props = property_list(params);
                let all = self.instances(&class.name);
                Ok(IReturn::NamedInstances(all.into_iter().map(|(p, i)| (p, filter_properties(i, &props))).collect()))
            }
            "enumerateinstancenames" => {
                let class = class_param(params)?;
                Ok(IReturn::InstanceNames(self.instances(&class.name).into_iter().map(|(p, _)| p).collect()))
            }
            "associators" => Ok(IReturn::ObjectsWithPath(self.associators(params)?)),
            "associatornames" => Ok(IReturn::ObjectPaths(self.associators(params)?.into_iter().map(|(p, _)| p).collect())),
            "references" => Ok(IReturn::ObjectsWithPath(self.references(params)?)),
            "referencenames" => Ok(IReturn::ObjectPaths(self.references(params)?.into_iter().map(|(p, _)| p).collect())),
            "execquery" => Ok(IReturn::ObjectsWithPath(self.exec_query(params)?)),
            _ => Err(CimError::new(
                CimStatusCode::NotSupported,
                format!("the intrinsic operation {method} is not supported; objects change only through the replication methods"),
            )),
        }
    }
}
