//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of `MAGLEV_TABLE_SIZE`
//! entries in which every backend owns an almost equal share, and which changes little when a
//! backend comes or goes, so few flows move. The table depends only on the set of backends, not on
//! their order, so every node computes the same one.

use orca_common::{Addr, Backend};

fn fnv1a64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The backend's address bytes (packet order) then its port bytes (network order): 6 bytes for IPv4, 18 for IPv6.
fn name<A: Addr>(b: &Backend<A>) -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    b.addr.each_byte(|x| v.push(x));
    v.extend_from_slice(&b.port.to_ne_bytes());
    v
}

/// The table for `backends`: entry `i` is the offset (in `backends`) of the backend that hash
/// bucket `i` maps to. Empty when there are no backends. `m` must be prime.
pub fn table<A: Addr>(backends: &[Backend<A>], m: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || m < 2 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    // Fill in a canonical order (sorted by address and port) so the result does not depend on the
    // order the endpoints were listed in.
    let mut order: Vec<usize> = (0..n).collect();
    // Address bytes in packet order compare as the address does.
    order.sort_by_key(|&i| (name(&backends[i]), u16::from_be(backends[i].port)));
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let nm = name(&backends[i]);
            let offset = fnv1a64(0xcbf2_9ce4_8422_2325, &nm) % m64;
            let skip = fnv1a64(0x8422_2325_cbf2_9ce4, &nm) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entries = vec![u32::MAX; m as usize];
    let mut filled = 0usize;
    loop {
        for (k, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = ((offset + next[k] * skip) % m64) as usize;
            while entries[c] != u32::MAX {
                next[k] += 1;
                c = ((offset + next[k] * skip) % m64) as usize;
            }
            entries[c] = order[k] as u32;
            next[k] += 1;
            filled += 1;
            if filled == m as usize {
                return entries;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<Backend> {
        (1..=n).map(|i| Backend::new([10, 244, 1, i], 8080)).collect()
    }

    fn owners(t: &[u32], bs: &[Backend]) -> Vec<(u32, u16)> {
        t.iter().map(|&o| (bs[o as usize].addr, bs[o as usize].port)).collect()
    }

    #[test]
    fn every_backend_owns_an_equal_share() {
        let bs = backends(7);
        let t = table(&bs, 1021);
        assert_eq!(t.len(), 1021);
        let mut counts = [0u32; 7];
        for o in &t {
            counts[*o as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "{counts:?}");
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let bs = backends(5);
        let mut rev = bs.clone();
        rev.reverse();
        assert_eq!(owners(&table(&bs, 1021), &bs), owners(&table(&rev, 1021), &rev));
    }

    #[test]
    fn removing_a_backend_moves_few_other_flows() {
        let bs = backends(10);
        let before = owners(&table(&bs, 1021), &bs);
        let gone = bs[3];
        let rest: Vec<Backend> = bs.iter().copied().filter(|b| *b != gone).collect();
        let after = owners(&table(&rest, 1021), &rest);
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != (gone.addr, gone.port) && b != a)
            .count();
        // Only the removed backend's ~102 buckets must move; Maglev moves a few more.
        assert!(
            moved_others < 1021 / 10,
            "{moved_others} buckets of other backends moved"
        );
        // A random re-spread would move about 90% of them.
    }
}
