//! Size limits for untrusted CIM-XML, and parsing a document within them.

use roxmltree::{Document, Node, ParsingOptions};

/// Largest accepted document, in bytes.
pub const MAX_INPUT_BYTES: usize = 4 * 1024 * 1024;
/// Deepest accepted element nesting.
pub const MAX_DEPTH: usize = 64;
/// Most elements accepted in one document.
pub const MAX_ELEMENTS: usize = 10_000;

/// A document that is malformed or over a limit.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum XmlLimitError {
    #[error("the XML is {0} bytes, over the limit of {MAX_INPUT_BYTES} bytes")]
    TooLarge(usize),
    #[error("the XML nests elements deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the XML has more than {MAX_ELEMENTS} elements")]
    TooManyElements,
    #[error("the XML is not well-formed: {0}")]
    Malformed(String),
}

/// Parses `text` (prolog and DOCTYPE allowed) and checks the depth and element limits.
pub(crate) fn parse_limited(text: &str) -> Result<Document<'_>, XmlLimitError> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(XmlLimitError::TooLarge(text.len()));
    }
    // Every element is at least one node; text nodes between elements at most double that.
    let opts = ParsingOptions {
        allow_dtd: true,
        nodes_limit: (MAX_ELEMENTS * 3) as u32,
        ..ParsingOptions::default()
    };
    let doc = Document::parse_with_options(text, opts).map_err(|e| match e {
        roxmltree::Error::NodesLimitReached => XmlLimitError::TooManyElements,
        e => XmlLimitError::Malformed(e.to_string()),
    })?;
    let mut elements = 0;
    check_depth(doc.root_element(), 1, &mut elements)?;
    Ok(doc)
}

fn check_depth(
    node: Node<'_, '_>,
    depth: usize,
    elements: &mut usize,
) -> Result<(), XmlLimitError> {
    if depth > MAX_DEPTH {
        return Err(XmlLimitError::TooDeep);
    }
    *elements += 1;
    if *elements > MAX_ELEMENTS {
        return Err(XmlLimitError::TooManyElements);
    }
    node.children()
        .filter(Node::is_element)
        .try_for_each(|c| check_depth(c, depth + 1, elements))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_deep_nesting() {
        let s = "<a>".repeat(65) + &"</a>".repeat(65);
        assert_eq!(parse_limited(&s).err(), Some(XmlLimitError::TooDeep));
        let ok = "<a>".repeat(64) + &"</a>".repeat(64);
        assert!(parse_limited(&ok).is_ok());
    }

    #[test]
    fn rejects_many_elements_and_big_input() {
        let s = format!("<r>{}</r>", "<a/>".repeat(MAX_ELEMENTS));
        assert_eq!(
            parse_limited(&s).err(),
            Some(XmlLimitError::TooManyElements)
        );
        let big = " ".repeat(MAX_INPUT_BYTES + 1);
        assert!(matches!(
            parse_limited(&big),
            Err(XmlLimitError::TooLarge(_))
        ));
    }

    #[test]
    fn accepts_prolog_and_doctype() {
        let s = "<?xml version=\"1.0\"?>\n<!DOCTYPE CIM SYSTEM \"cim.dtd\">\n<CIM/>";
        assert!(parse_limited(s).is_ok());
    }
}
