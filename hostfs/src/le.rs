//! Little-endian integers at byte offsets of on-disk structures (ext4's
//! superblock and inodes, LVM labels, btrfs chunk items): `None` when the
//! integer would end past the bytes, so a short or malformed structure is
//! an error its decoder names, never a panic.

/// The `u16` at `at`.
pub fn u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// The `u32` at `at`.
pub fn u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The `u64` at `at`.
pub fn u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn integers_are_read_little_endian_and_none_past_the_end() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(super::u16(&b, 0), Some(0x0201));
        assert_eq!(super::u32(&b, 1), Some(0x0504_0302));
        assert_eq!(super::u64(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(super::u64(&b, 2), None);
        assert_eq!(super::u32(&b, 6), None);
        assert_eq!(super::u16(&b, 8), None);
        assert_eq!(super::u16(&b, usize::MAX), None);
    }
}
