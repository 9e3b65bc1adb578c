//! The CIM-XML codec (DSP0201): request and embedded-instance decoding with roxmltree under
//! size limits, and response encoding by hand-built, escaped strings.

mod decode_instance;
mod decode_path;
mod embedded;
mod encode_class;
mod encode_instance;
mod encode_path;
mod escape;
mod limits;
mod request;
mod response;
mod shape;

pub use embedded::{parse_embedded_instance, EmbeddedInstanceError};
pub use encode_class::encode_class;
pub use encode_instance::encode_instance;
pub use limits::{XmlLimitError, MAX_DEPTH, MAX_ELEMENTS, MAX_INPUT_BYTES};
pub use request::{parse_request, CimRequest, ParamData, ParamValue, RequestError};
pub use response::{
    encode_imethod_response, encode_method_response, CimError, CimStatusCode, IReturn, OutParam,
};
pub use shape::XmlShapeError;
