//! CIM for vmreplica: values, datetimes, object paths, instances and class declarations, the
//! CIM-XML codec (DSP0200/DSP0201) used by WBEM clients such as pywbem and sblim-wbemcli, the
//! embedded-instance string format Hyper-V methods take, and the small WQL subset the daemon
//! answers. Everything here is pure: no I/O, and every parser of untrusted text has size limits.

mod class;
mod datetime;
mod instance;
mod mof;
mod path;
mod value;
mod wql;
mod xml;

pub use class::{CimClass, MethodDecl, ParamDecl, PropertyDecl, Qualifier};
pub use datetime::{CimDateTime, DateTimeError};
pub use instance::{CimInstance, CimProperty};
pub use mof::MofError;
pub use path::{KeyValue, ObjectPath, PathError};
pub use value::{CimType, CimValue, ValueError};
pub use wql::{parse_wql, WqlError, WqlLiteral, WqlQuery};
pub use xml::*;
