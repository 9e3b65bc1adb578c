//! A macro for the CIM `uint16` enumerations: one place that writes the enum, its `ALL` list and the
//! `as_u16` / `from_u16` conversions, so the numbers are typed once (next to their names).

/// Declares a `#[repr(u16)]` enum with `ALL`, `as_u16()` and `from_u16()`.
macro_rules! numbered_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $value:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[repr(u16)]
        pub enum $name { $( $(#[$vmeta])* $variant = $value ),+ }

        impl $name {
            /// Every value, in declaration (numeric) order.
            pub const ALL: [$name; [$($value),+].len()] = [$($name::$variant),+];

            /// The number CIM uses.
            pub fn as_u16(self) -> u16 {
                self as u16
            }

            /// The value for a CIM number, or `None` when the number is not defined.
            pub fn from_u16(value: u16) -> Option<Self> {
                match value {
                    $( $value => Some($name::$variant), )+
                    _ => None,
                }
            }
        }
    };
}

pub(crate) use numbered_enum;
