//! Instruction families several parts of the executor pick out (the
//! generic handler table, the specialized handlers, native runs), named
//! once here.

use iced_x86::{Mnemonic, OpKind};

/// The integer moves and arithmetic that, in their register and
/// immediate forms, only read and write general-purpose registers and
/// status flags and can raise nothing: what both the dead-flag pass
/// (`fast::never_stops`) and native runs (`native::eligible`) build on.
pub(crate) fn is_register_alu(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Add
            | M::Or
            | M::Adc
            | M::Sbb
            | M::And
            | M::Sub
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Mov
            | M::Lea
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Imul
            | M::Shl
            | M::Sal
            | M::Shr
            | M::Sar
            | M::Rol
            | M::Ror
            | M::Nop
    )
}

/// CMOVcc, any condition.
pub(crate) fn is_cmovcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
    )
}

/// SETcc, any condition.
pub(crate) fn is_setcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
    )
}

/// An immediate operand (the first immediate of an instruction; ENTER's
/// second is `Immediate8_2nd`, not included).
pub(crate) fn is_immediate(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

#[cfg(test)]
mod tests {
    use iced_x86::Mnemonic;

    #[test]
    fn families_have_sixteen_conditions() {
        let (mut cmov, mut set) = (0, 0);
        for m in Mnemonic::values() {
            cmov += usize::from(super::is_cmovcc(m));
            set += usize::from(super::is_setcc(m));
        }
        assert_eq!((cmov, set), (16, 16));
    }
}
