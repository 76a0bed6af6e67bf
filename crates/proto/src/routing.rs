//! Which shard a user belongs to: the one function every client, gateway and node
//! must agree on, so it is part of the API.

/// The shard of `user` among `shard_count` shards: FNV-1a (64-bit) of the user id's
/// UTF-8 bytes, modulo the count. FNV is fixed by its constants, so the mapping is
/// the same in every process, on every platform, in every version.
pub fn shard_for(user: &str, shard_count: u32) -> u32 {
    shard_for_bytes(user.as_bytes(), shard_count)
}

/// [`shard_for`] of a user id's bytes, read off the wire before anyone
/// checked that they are UTF-8.
pub fn shard_for_bytes(user: &[u8], shard_count: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = user
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(shard_count.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_is_fixed() {
        // Published FNV-1a test vectors: "" and "a".
        assert_eq!(
            shard_for("", u32::MAX),
            (0xcbf2_9ce4_8422_2325u64 % u64::from(u32::MAX)) as u32
        );
        assert_eq!(
            shard_for("a", u32::MAX),
            (0xaf63_dc4c_8601_ec8cu64 % u64::from(u32::MAX)) as u32
        );
        assert_eq!(shard_for("alice", 1), 0);
        assert_eq!(
            shard_for("alice", 0),
            0,
            "a zero count is treated as one shard"
        );
    }

    #[test]
    fn users_spread_evenly_over_shards() {
        let mut counts = vec![0u32; 256];
        for i in 0..256_000 {
            counts[shard_for(&format!("user-{i}"), 256) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "uneven: {min}..{max}");
    }
}
