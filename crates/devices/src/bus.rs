//! An address bus that routes guest accesses to the device that claims them.
//!
//! The same type serves port I/O (addresses are 16-bit port numbers) and MMIO
//! (addresses are guest-physical). The bus is shared between vCPU threads
//! (e.g. as `Arc<Bus>`); registration takes `&self` so devices can also be
//! added after the bus is shared. The range map sits behind a read-write
//! lock that accesses only ever take for reading (uncontended in practice:
//! writers exist only while the machine is assembled), plus the target
//! device's own mutex for the duration of one access, so accesses to
//! different devices proceed in parallel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

/// A device that sits on a [`Bus`].
///
/// `offset` is the accessed address minus the base of the range the device
/// was registered at (plus the range's `device_offset`, see
/// [`Bus::insert_with_offset`]). `data.len()` is the access width as issued by
/// the guest (1, 2, 4 or 8 bytes for port I/O and ordinary MMIO; anything for
/// a careless guest), and devices must cope with every value without
/// panicking.
pub trait BusDevice: Send {
    /// Serves a guest read; the device fills `data` completely.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Serves a guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a range could not be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range must cover at least one address.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// `base + len` does not fit in the 64-bit address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range intersects a range that is already registered.
    #[error(
        "bus range {base:#x}..{end:#x} overlaps the registered range {existing_base:#x}..{existing_end:#x}",
        end = base.wrapping_add(*len),
        existing_end = existing_base.wrapping_add(*existing_len)
    )]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range it collides with.
        existing_base: u64,
        /// Length of the range it collides with.
        existing_len: u64,
    },
}

struct Entry {
    len: u64,
    /// Added to `addr - base` before the device sees the offset.
    device_offset: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Routes reads and writes by address to registered [`BusDevice`]s.
#[derive(Default)]
pub struct Bus {
    /// Keyed by range base. Ranges never overlap, so the only candidate for
    /// an address is the range with the greatest base not above it.
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.ranges()
                    .iter()
                    .map(|(base, e)| (*base, e.len, e.device_offset)),
            )
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for the addresses `base..base + len`; it sees
    /// offsets starting at 0.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.insert_with_offset(device, base, len, 0)
    }

    /// Like [`Bus::insert`], but the device sees offsets starting at
    /// `device_offset`. This lets one device own several disjoint ranges
    /// without claiming the gap between them; e.g. the i8042 is registered at
    /// port 0x60 (offset 0) and at port 0x64 with `device_offset` 4, leaving
    /// port 0x61 (PC speaker / NMI status) free.
    pub fn insert_with_offset(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
        device_offset: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;
        // The device must also be able to express every offset it will see.
        if device_offset.checked_add(len - 1).is_none() {
            return Err(BusError::Overflow { base, len });
        }
        // Checking and inserting under one write lock makes concurrent
        // registrations race-free.
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        // Any existing range that intersects [base, last] starts at or below
        // `last`; of those, the one with the greatest start is the one to
        // check (ranges are disjoint, so if any intersects, this one does).
        if let Some((&existing_base, e)) = ranges.range(..=last).next_back() {
            // existing_base <= last; it overlaps unless it ends before `base`.
            if existing_base.saturating_add(e.len - 1) >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    existing_base,
                    existing_len: e.len,
                });
            }
        }
        ranges.insert(
            base,
            Entry {
                len,
                device_offset,
                device,
            },
        );
        Ok(())
    }

    /// The range map, for reading. Poisoning is ignored: inserts validate
    /// before they modify, so the map is consistent even if one panicked.
    fn ranges(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds the device claiming every byte of `addr..addr + size` and the
    /// offset it should see. Accesses that start inside a range but run past
    /// its end are not claimed: no device has to handle bytes it does not own.
    fn resolve(ranges: &BTreeMap<u64, Entry>, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        if size == 0 {
            return None;
        }
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        let rel = addr - base; // base <= addr by construction of the range query
        let size = u64::try_from(size).ok()?;
        let end = rel.checked_add(size)?;
        if end > entry.len {
            return None;
        }
        Some((entry, rel + entry.device_offset))
    }

    /// Reads `data.len()` bytes at `addr`. Returns false (leaving `data`
    /// untouched) when no single device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let ranges = self.ranges();
        match Self::resolve(&ranges, addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes `data` at `addr`. Returns false when no single device claims
    /// the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let ranges = self.ranges();
        match Self::resolve(&ranges, addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Number of registered ranges.
    pub fn len(&self) -> usize {
        self.ranges().len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.ranges().is_empty()
    }
}

/// Locks a device, ignoring poisoning: a device whose handler panicked on
/// another vCPU thread still holds consistent-enough register state, and
/// taking the whole VMM down from the next unrelated access helps nobody.
fn lock(device: &Arc<Mutex<dyn BusDevice>>) -> MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn bus_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Bus>();
    }

    #[test]
    fn insert_rejects_zero_length_and_overflow() {
        let bus = Bus::new();
        assert_eq!(
            bus.insert(probe(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert_eq!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        // A range ending exactly at the top of the address space is fine.
        bus.insert(probe(), u64::MAX, 1).unwrap();
        bus.insert(probe(), u64::MAX - 10, 10).unwrap();
        assert_eq!(bus.len(), 2);
        assert!(matches!(
            bus.insert_with_offset(probe(), 0, 4, u64::MAX),
            Err(BusError::Overflow { .. })
        ));
    }

    #[test]
    fn insert_rejects_overlaps() {
        let bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        bus.insert(probe(), 0x200, 0x10).unwrap();
        for (base, len) in [
            (0x100, 1),
            (0x10f, 1),
            (0xf0, 0x11),
            (0x105, 0x100),
            (0x0, 0x1000),
            (0x1ff, 2),
        ] {
            let err = bus.insert(probe(), base, len).unwrap_err();
            assert!(
                matches!(err, BusError::Overlap { .. }),
                "{base:#x}+{len:#x}"
            );
            // The message names both ranges.
            assert!(err.to_string().contains("overlaps"));
        }
        // Adjacent ranges on both sides are fine.
        bus.insert(probe(), 0xf0, 0x10).unwrap();
        bus.insert(probe(), 0x110, 0xf0).unwrap();
        assert_eq!(bus.len(), 4);
    }

    #[test]
    fn lookup_routes_to_device_with_relative_offset() {
        let bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x70, 2).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x71, &[0xab]));
        assert_eq!(b.lock().unwrap().last_write, Some((1, vec![0xab])));
        assert!(a.lock().unwrap().last_write.is_none());

        // Unclaimed addresses: below, between and above the ranges.
        assert!(!bus.read(0x6f, &mut data));
        assert!(!bus.write(0x72, &[0]));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.read(0, &mut data));
        assert!(!bus.read(u64::MAX, &mut data));
    }

    #[test]
    fn straddling_and_empty_accesses_are_not_claimed() {
        let bus = Bus::new();
        let dev = probe();
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();

        let mut word = [0u8; 4];
        assert!(bus.read(0x100c, &mut word)); // last four bytes: inside
        assert!(!bus.read(0x100d, &mut word)); // runs one byte past the end
        assert!(!bus.write(0x100f, &[1, 2]));
        assert!(!bus.read(0x1000, &mut []));
        assert!(dev.lock().unwrap().last_write.is_none());

        // A huge access starting near u64::MAX must not overflow.
        bus.insert(probe(), u64::MAX - 3, 4).unwrap();
        let mut big = vec![0u8; 16];
        assert!(!bus.read(u64::MAX - 3, &mut big));
        assert!(bus.read(u64::MAX - 3, &mut big[..4]));
    }

    #[test]
    fn device_offset_is_added() {
        let bus = Bus::new();
        let dev = probe();
        bus.insert(dev.clone(), 0x60, 1).unwrap();
        bus.insert_with_offset(dev.clone(), 0x64, 1, 4).unwrap();
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(dev.lock().unwrap().last_write, Some((4, vec![0xfe])));
        let mut data = [0u8; 1];
        assert!(bus.read(0x60, &mut data));
        assert_eq!(data, [0]);
        assert!(!bus.read(0x61, &mut data));
    }

    #[test]
    fn poisoned_device_still_serves_accesses() {
        let bus = Bus::new();
        let dev = probe();
        bus.insert(dev.clone(), 0, 4).unwrap();
        let d = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = d.lock().unwrap();
            panic!("poison the mutex");
        })
        .join();
        assert!(dev.is_poisoned());
        assert!(bus.write(2, &[7]));
    }
}
