//! A device that absorbs accesses to ports nobody models.

use crate::bus::BusDevice;

/// The POST diagnostic port, written by firmware and (for I/O delays) by
/// Linux; claiming it with a [`Sink`] keeps those writes cheap and quiet.
pub const POST_CODE_PORT: u16 = 0x80;

/// Ignores writes and reads as all-ones, like an empty ISA slot.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ones() {
        let mut s = Sink;
        let mut b = [0u8; 3];
        s.read(7, &mut b);
        assert_eq!(b, [0xff; 3]);
        s.write(0, &[1, 2, 3]);
    }
}
