//! Encoding of refcount block entries, for every refcount width.

use super::types::RefcountOrder;

/// Writes `value` as entry `index` of a refcount block. Widths below a byte
/// are packed from the least significant bit up; wider ones are big-endian.
/// `value` must fit the width; callers only store small counts.
pub fn set_entry(block: &mut [u8], order: RefcountOrder, index: usize, value: u64) {
    match order.order() {
        o @ 0..=2 => {
            let width = 1usize << o;
            let per_byte = 8 / width;
            let shift = (index % per_byte) * width;
            let mask = (((1u16 << width) - 1) as u8) << shift;
            let byte = &mut block[index / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        o => {
            let width = 1usize << (o - 3);
            let bytes = value.to_be_bytes();
            block[index * width..(index + 1) * width].copy_from_slice(&bytes[8 - width..]);
        }
    }
}

/// Reads entry `index` of a refcount block (inverse of [`set_entry`]).
pub fn get_entry(block: &[u8], order: RefcountOrder, index: usize) -> u64 {
    match order.order() {
        o @ 0..=2 => {
            let width = 1usize << o;
            let per_byte = 8 / width;
            let shift = (index % per_byte) * width;
            u64::from((block[index / per_byte] >> shift) & (((1u16 << width) - 1) as u8))
        }
        o => {
            let width = 1usize << (o - 3);
            block[index * width..(index + 1) * width]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
    }
}

/// Fills `block` with its first `ones` entries set to 1 and the rest 0.
pub fn fill_leading_ones(block: &mut [u8], order: RefcountOrder, ones: usize) {
    block.fill(0);
    for index in 0..ones {
        set_entry(block, order, index, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_at_every_width() {
        for order in 0..=6 {
            let order = RefcountOrder::from_order(order).expect("order");
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / order.width_bits() as usize;
            let max = if order.width_bits() == 64 {
                u64::MAX
            } else {
                (1 << order.width_bits()) - 1
            };
            for i in 0..entries {
                set_entry(&mut block, order, i, (i as u64) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i as u64) & max,
                    "order {order:?} entry {i}"
                );
            }
        }
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian_and_one_bit_entries_lsb_first() {
        let mut block = [0u8; 4];
        set_entry(&mut block, RefcountOrder::DEFAULT, 1, 1);
        assert_eq!(block, [0, 0, 0, 1]);
        let mut bits = [0u8; 1];
        set_entry(
            &mut bits,
            RefcountOrder::from_order(0).expect("order"),
            0,
            1,
        );
        set_entry(
            &mut bits,
            RefcountOrder::from_order(0).expect("order"),
            3,
            1,
        );
        assert_eq!(bits, [0b0000_1001]);
    }
}
