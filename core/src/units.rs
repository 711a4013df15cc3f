//! Units in types: byte counts, block counts, block sizes and offsets never
//! travel as bare integers through public APIs.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! unit {
    ($(#[$m:meta])* $name:ident, $suffix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", self.0, $suffix)
            }
        }
    };
}

unit!(
    /// A length in bytes.
    Bytes,
    ""
);
unit!(
    /// A count of blocks of some [`BlockSize`].
    Blocks,
    " blocks"
);
unit!(
    /// A byte offset on a device (LUN, disk, image file).
    DeviceOffset,
    ""
);
unit!(
    /// A byte offset inside an item (a volume's or a file's logical space).
    ItemOffset,
    ""
);

/// The size of one block in bytes (512, 4096, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockSize(pub u32);

impl BlockSize {
    /// 512-byte sectors.
    pub const SECTOR: BlockSize = BlockSize(512);

    /// The raw value.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// `count` blocks of this size, in bytes; `None` on overflow.
    pub fn bytes(self, count: Blocks) -> Option<Bytes> {
        count.0.checked_mul(u64::from(self.0)).map(Bytes)
    }

    /// The device offset of block `block`; `None` on overflow.
    pub fn offset(self, block: Blocks) -> Option<DeviceOffset> {
        block.0.checked_mul(u64::from(self.0)).map(DeviceOffset)
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}B", self.0)
    }
}

impl std::str::FromStr for Bytes {
    type Err = String;

    /// `4096`, `64K`, `16M`, `2G` (binary multiples).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (num, shift) = match s.chars().last() {
            Some('K' | 'k') => (&s[..s.len() - 1], 10),
            Some('M' | 'm') => (&s[..s.len() - 1], 20),
            Some('G' | 'g') => (&s[..s.len() - 1], 30),
            Some('T' | 't') => (&s[..s.len() - 1], 40),
            _ => (s, 0),
        };
        let n: u64 = num.parse().map_err(|_| {
            format!("bad size {s:?}: expected a number with an optional K, M, G or T")
        })?;
        n.checked_mul(1u64 << shift)
            .map(Bytes)
            .ok_or_else(|| format!("size {s:?} overflows"))
    }
}
