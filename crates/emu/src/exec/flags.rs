//! Eager status-flag computation.
//!
//! Every helper works on values already truncated to the operand size
//! (`size` in bytes: 1, 2, 4 or 8) and returns the result with the new
//! status flags as an RFLAGS-shaped word; callers merge the flags with a
//! mask of the bits the instruction defines.

use crate::state::rflags::{AF, CF, OF, PF, SF, ZF};

#[inline(always)]
pub fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

#[inline(always)]
pub fn sign_bit(size: usize) -> u64 {
    // Sizes come from decoded operands (1..=8); clamp so a zero can never
    // make the shift overflow.
    1u64 << (size.clamp(1, 8) * 8 - 1)
}

/// Sign-extends the low `size` bytes of `v` to 64 bits.
#[inline(always)]
pub fn sext(v: u64, size: usize) -> u64 {
    let shift = 64 - size.clamp(1, 8) as u32 * 8;
    (((v << shift) as i64) >> shift) as u64
}

/// PF: set when the low byte has an even number of ones.
#[inline(always)]
pub fn parity(v: u64) -> u64 {
    if (v as u8).count_ones() & 1 == 0 {
        PF
    } else {
        0
    }
}

/// SF, ZF and PF of a result.
#[inline(always)]
pub fn szp(res: u64, size: usize) -> u64 {
    let r = res & mask(size);
    let mut f = parity(r);
    if r == 0 {
        f |= ZF;
    }
    if r & sign_bit(size) != 0 {
        f |= SF;
    }
    f
}

/// `a + b + carry` with all six flags.
#[inline(always)]
pub fn add(a: u64, b: u64, carry: u64, size: usize) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let full = u128::from(a) + u128::from(b) + u128::from(carry & 1);
    let res = full as u64 & m;
    let mut f = szp(res, size) | ((a ^ b ^ res) & AF);
    if full >> (size * 8) != 0 {
        f |= CF;
    }
    if (a ^ res) & (b ^ res) & sign_bit(size) != 0 {
        f |= OF;
    }
    (res, f)
}

/// `a - b - borrow` with all six flags (CMP, SUB, SBB, NEG as 0 - b).
#[inline(always)]
pub fn sub(a: u64, b: u64, borrow: u64, size: usize) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let res = a.wrapping_sub(b).wrapping_sub(borrow & 1) & m;
    let mut f = szp(res, size) | ((a ^ b ^ res) & AF);
    if u128::from(a) < u128::from(b) + u128::from(borrow & 1) {
        f |= CF;
    }
    if (a ^ b) & (a ^ res) & sign_bit(size) != 0 {
        f |= OF;
    }
    (res, f)
}

/// Flags of AND/OR/XOR/TEST: CF = OF = 0; AF is undefined and left 0.
#[inline(always)]
pub fn logic(res: u64, size: usize) -> u64 {
    szp(res, size)
}

/// Evaluates a condition code (the low nibble of Jcc/SETcc/CMOVcc
/// opcodes) against RFLAGS.
#[inline(always)]
pub fn condition(cc: u8, fl: u64) -> bool {
    let cf = fl & CF != 0;
    let zf = fl & ZF != 0;
    let sf = fl & SF != 0;
    let of = fl & OF != 0;
    let pf = fl & PF != 0;
    let base = match cc >> 1 {
        0 => of,
        1 => cf,
        2 => zf,
        3 => cf || zf,
        4 => sf,
        5 => pf,
        6 => sf != of,
        _ => zf || (sf != of),
    };
    base ^ (cc & 1 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sub_edges() {
        assert_eq!(add(0xff, 1, 0, 1), (0, CF | ZF | PF | AF));
        assert_eq!(add(0x7f, 1, 0, 1).1 & OF, OF);
        assert_eq!(sub(0, 1, 0, 8).0, u64::MAX);
        assert_eq!(sub(0, 1, 0, 8).1 & CF, CF);
        assert_eq!(sub(0x80, 1, 0, 1).1 & OF, OF);
        assert_eq!(add(u64::MAX, u64::MAX, 1, 8), (u64::MAX, CF | SF | PF | AF));
        assert_eq!(sext(0x80, 1), 0xffff_ffff_ffff_ff80);
        assert!(condition(4, ZF));
        assert!(!condition(5, ZF));
    }
}
