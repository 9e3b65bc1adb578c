//! Errors about the element structure of CIM-XML, and small helpers for walking it.

use roxmltree::Node;

use crate::{PathError, ValueError};

/// CIM-XML whose elements or attributes do not follow DSP0201.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum XmlShapeError {
    #[error("{element} has no {attribute} attribute")]
    MissingAttribute {
        element: String,
        attribute: &'static str,
    },
    #[error("{parent} has no {expected} element")]
    MissingChild {
        parent: String,
        expected: &'static str,
    },
    #[error("{parent} may not contain {found}")]
    UnexpectedChild { parent: String, found: String },
    #[error("'{0}' is not a CIM type")]
    UnknownType(String),
    #[error("property {property}: {error}")]
    BadValue { property: String, error: ValueError },
    #[error("{element} holds a bad object path: {error}")]
    BadPath { element: String, error: PathError },
}

pub(crate) type Node2<'a, 'input> = Node<'a, 'input>;

/// The element children of `node`.
pub(crate) fn elements<'a, 'i>(node: Node2<'a, 'i>) -> impl Iterator<Item = Node2<'a, 'i>> {
    node.children().filter(Node::is_element)
}

/// The first element child, if any.
pub(crate) fn first_element<'a, 'i>(node: Node2<'a, 'i>) -> Option<Node2<'a, 'i>> {
    elements(node).next()
}

/// The first child element named `tag`.
pub(crate) fn child<'a, 'i>(node: Node2<'a, 'i>, tag: &str) -> Option<Node2<'a, 'i>> {
    elements(node).find(|c| c.has_tag_name(tag))
}

/// The child element named `tag`, or an error naming the parent.
pub(crate) fn require_child<'a, 'i>(
    node: Node2<'a, 'i>,
    tag: &'static str,
) -> Result<Node2<'a, 'i>, XmlShapeError> {
    child(node, tag).ok_or_else(|| XmlShapeError::MissingChild {
        parent: name(node),
        expected: tag,
    })
}

/// The attribute `attr`, or an error naming the element.
pub(crate) fn require_attr<'a>(
    node: Node2<'a, '_>,
    attr: &'static str,
) -> Result<&'a str, XmlShapeError> {
    node.attribute(attr)
        .ok_or_else(|| XmlShapeError::MissingAttribute {
            element: name(node),
            attribute: attr,
        })
}

/// The element's tag name.
pub(crate) fn name(node: Node2<'_, '_>) -> String {
    node.tag_name().name().to_string()
}

/// All text inside the element, concatenated.
pub(crate) fn text(node: Node2<'_, '_>) -> String {
    node.descendants()
        .filter(Node::is_text)
        .filter_map(|n| n.text())
        .collect()
}

/// An error for a child element that is not allowed where it is.
pub(crate) fn unexpected(parent: Node2<'_, '_>, found: Node2<'_, '_>) -> XmlShapeError {
    XmlShapeError::UnexpectedChild {
        parent: name(parent),
        found: name(found),
    }
}

/// The `TYPE`/`PARAMTYPE` attribute parsed as a CIM type (absent means string).
pub(crate) fn type_attr(node: Node2<'_, '_>, attr: &str) -> Result<crate::CimType, XmlShapeError> {
    match node.attribute(attr) {
        None => Ok(crate::CimType::String),
        Some(t) => {
            crate::CimType::parse(t).ok_or_else(|| XmlShapeError::UnknownType(t.to_string()))
        }
    }
}
