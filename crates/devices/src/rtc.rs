//! An MC146818-compatible CMOS real-time clock at ports 0x70 (index) and
//! 0x71 (data).
//!
//! The clock has no state of its own: each read of a time register converts
//! the host's wall clock (UTC) plus a guest-chosen offset into calendar
//! fields, so it never drifts and the update-in-progress flag is never set.
//! When the guest sets the time (Linux: SET bit in register B, write the
//! fields, clear SET), the new time is stored as an offset from host time.
//! Register B's binary/BCD (bit 2) and 12/24-hour (bit 1) modes are honoured
//! on every access. The remaining CMOS bytes are plain storage. No
//! interrupts (alarm, periodic, update-ended) are generated.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// The index port; bit 7 of the written value is the NMI mask (ignored).
pub const RTC_INDEX_PORT: u16 = 0x70;
/// The data port.
pub const RTC_DATA_PORT: u16 = 0x71;
/// Bus length covering both ports, starting at [`RTC_INDEX_PORT`].
pub const RTC_LEN: u64 = 2;
/// CMOS index of the century byte (advertise it in the FADT so Linux uses it).
pub const RTC_CENTURY_INDEX: u8 = 0x32;

const CMOS_SIZE: usize = 128;
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

const TIME_REGS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_DAY_OF_WEEK,
    REG_DAY_OF_MONTH,
    REG_MONTH,
    REG_YEAR,
    RTC_CENTURY_INDEX,
];

const A_UIP: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate: the power-on value.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// 24-hour BCD, which is what PC firmware leaves and what x86 Linux expects
/// (it decodes the time registers as BCD regardless of the DM bit).
const B_DEFAULT: u8 = B_24H;
const D_VALID_RAM: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

const SECS_PER_DAY: i64 = 86_400;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,  // 1-12
    day: u8,    // 1-31
    hour: u8,   // 0-23
    minute: u8, // 0-59
    second: u8, // 0-59
}

// Both conversions below use the proleptic Gregorian calendar in a form that
// shifts the year to start in March (so the leap day is last) and counts in
// 400-year eras of 146097 days; 719468 is the day number of 1970-01-01 in
// that count.

/// Days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of March-based year, 0..=365
    let mp = (5 * doy + 2) / 153; // March-based month, 0..=11
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8; // 1..=31
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8; // 1..=12
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month 1-12, day 1-31) to days since 1970-01-01. Days past the end
/// of the month roll into the next one.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = year - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let rem = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    fn to_unix(self) -> i64 {
        // Saturating: only reachable with absurd host clocks, but the result
        // must not overflow whatever the inputs.
        days_from_civil(self.year, self.month, self.day)
            .saturating_mul(SECS_PER_DAY)
            .saturating_add(
                i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second),
            )
    }

    /// 1 = Sunday ... 7 = Saturday, as the RTC counts.
    fn day_of_week(self) -> u8 {
        let days = days_from_civil(self.year, self.month, self.day);
        // 1970-01-01 was a Thursday (index 4 with Sunday = 0).
        (days + 4).rem_euclid(7) as u8 + 1
    }
}

/// How register B says values are encoded.
#[derive(Debug, Clone, Copy)]
struct Mode {
    binary: bool,
    h24: bool,
}

impl Mode {
    fn from_b(b: u8) -> Self {
        Mode {
            binary: b & B_BINARY != 0,
            h24: b & B_24H != 0,
        }
    }

    /// Encodes 0..=99.
    fn encode(self, v: u8) -> u8 {
        if self.binary {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    /// Decodes a value the guest wrote; None for BCD digits above 9.
    fn decode(self, v: u8) -> Option<u8> {
        if self.binary {
            return Some(v);
        }
        let (hi, lo) = (v >> 4, v & 0x0f);
        (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
    }

    fn encode_hour(self, h: u8) -> u8 {
        if self.h24 {
            return self.encode(h);
        }
        let pm = h >= 12;
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | if pm { HOUR_PM } else { 0 }
    }

    fn decode_hour(self, v: u8) -> Option<u8> {
        if self.h24 {
            return self.decode(v).filter(|h| *h <= 23);
        }
        let h = self.decode(v & !HOUR_PM).filter(|h| (1..=12).contains(h))?;
        Some(h % 12 + if v & HOUR_PM != 0 { 12 } else { 0 })
    }

    /// The raw register contents for time field `reg` of `t`.
    fn encode_field(self, t: DateTime, reg: u8) -> u8 {
        // Years outside 0..=9999 cannot be expressed; clamp rather than wrap.
        let year = t.year.clamp(0, 9999);
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_DAY_OF_WEEK => self.encode(t.day_of_week()),
            REG_DAY_OF_MONTH => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((year % 100) as u8),
            RTC_CENTURY_INDEX => self.encode((year / 100) as u8),
            _ => 0,
        }
    }

    /// Applies the raw value `v` of time field `reg` to `t`; None if the
    /// value is out of range for the field.
    fn apply_field(self, t: &mut DateTime, reg: u8, v: u8) -> Option<()> {
        let in_range = |x: u8, lo: u8, hi: u8| (lo..=hi).contains(&x).then_some(x);
        match reg {
            REG_SECONDS => t.second = in_range(self.decode(v)?, 0, 59)?,
            REG_MINUTES => t.minute = in_range(self.decode(v)?, 0, 59)?,
            REG_HOURS => t.hour = self.decode_hour(v)?,
            // Derived from the date; writes are accepted and ignored.
            REG_DAY_OF_WEEK => {}
            REG_DAY_OF_MONTH => t.day = in_range(self.decode(v)?, 1, 31)?,
            REG_MONTH => t.month = in_range(self.decode(v)?, 1, 12)?,
            REG_YEAR => {
                let y = in_range(self.decode(v)?, 0, 99)?;
                t.year = t.year.clamp(0, 9999) / 100 * 100 + i64::from(y);
            }
            RTC_CENTURY_INDEX => {
                let c = in_range(self.decode(v)?, 0, 99)?;
                t.year = i64::from(c) * 100 + t.year.clamp(0, 9999) % 100;
            }
            _ => return None,
        }
        Some(())
    }
}

fn host_unix_time() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // A host clock before 1970: count backwards.
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// The CMOS RTC. Register it at [`RTC_INDEX_PORT`] with length [`RTC_LEN`].
pub struct Rtc {
    index: u8,
    cmos: [u8; CMOS_SIZE],
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// Source of host time (seconds since the epoch); replaceable in tests.
    clock: Box<dyn Fn() -> i64 + Send>,
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc")
            .field("index", &self.index)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC following the host's wall clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(host_unix_time))
    }

    fn with_clock(clock: Box<dyn Fn() -> i64 + Send>) -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_DEFAULT;
        cmos[usize::from(REG_D)] = D_VALID_RAM;
        Self {
            index: 0,
            cmos,
            offset: 0,
            clock,
        }
    }

    /// Sets a non-clock CMOS byte (e.g. firmware memory-size fields) before
    /// the guest starts. Returns false, changing nothing, for indices beyond
    /// the 128-byte CMOS or for the clock and status registers.
    pub fn set_cmos_byte(&mut self, index: u8, value: u8) -> bool {
        if usize::from(index) >= CMOS_SIZE || index <= REG_D || index == RTC_CENTURY_INDEX {
            return false;
        }
        self.cmos[usize::from(index)] = value;
        true
    }

    fn mode(&self) -> Mode {
        Mode::from_b(self.cmos[usize::from(REG_B)])
    }

    fn set_mode_active(&self) -> bool {
        self.cmos[usize::from(REG_B)] & B_SET != 0
    }

    fn guest_now(&self) -> DateTime {
        DateTime::from_unix((self.clock)().saturating_add(self.offset))
    }

    /// Makes `t` the guest's current time.
    fn set_guest_time(&mut self, t: DateTime) {
        self.offset = t.to_unix().saturating_sub((self.clock)());
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        match reg {
            r if TIME_REGS.contains(&r) => {
                if self.set_mode_active() {
                    // Updates are frozen while the guest sets the clock; it
                    // reads back what it wrote.
                    self.cmos[usize::from(r)]
                } else {
                    self.mode().encode_field(self.guest_now(), r)
                }
            }
            // The update cycle is instantaneous: UIP never reads as set.
            REG_A => self.cmos[usize::from(REG_A)] & !A_UIP,
            // No interrupt sources, so no flags.
            REG_C => 0,
            REG_D => self.cmos[usize::from(REG_D)] | D_VALID_RAM,
            r => self.cmos[usize::from(r) % CMOS_SIZE],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            r if TIME_REGS.contains(&r) => {
                if self.set_mode_active() {
                    self.cmos[usize::from(r)] = value;
                } else {
                    // A single field written while the clock runs: change just
                    // that field of the current time.
                    let mode = self.mode();
                    let mut t = self.guest_now();
                    match mode.apply_field(&mut t, r, value) {
                        Some(()) => self.set_guest_time(t),
                        None => tracing::debug!(
                            "rtc: ignoring invalid value {value:#04x} for register {r:#04x}"
                        ),
                    }
                }
            }
            REG_A => self.cmos[usize::from(REG_A)] = value & !A_UIP,
            REG_B => self.write_b(value),
            REG_C => {}
            REG_D => self.cmos[usize::from(REG_D)] = value & !D_VALID_RAM,
            r => self.cmos[usize::from(r) % CMOS_SIZE] = value,
        }
    }

    fn write_b(&mut self, value: u8) {
        let old = self.cmos[usize::from(REG_B)];
        let entering_set = old & B_SET == 0 && value & B_SET != 0;
        let leaving_set = old & B_SET != 0 && value & B_SET == 0;
        if entering_set {
            // Latch the current time into the registers, in the mode the
            // guest is switching to, so partial updates keep other fields.
            let mode = Mode::from_b(value);
            let now = self.guest_now();
            for r in TIME_REGS {
                self.cmos[usize::from(r)] = mode.encode_field(now, r);
            }
        }
        if leaving_set {
            // The fields were written in the mode in effect until now.
            let mode = Mode::from_b(old);
            let mut t = self.guest_now();
            let ok = TIME_REGS.iter().all(|&r| {
                mode.apply_field(&mut t, r, self.cmos[usize::from(r)])
                    .is_some()
            });
            if ok {
                self.set_guest_time(t);
            } else {
                tracing::debug!(
                    "rtc: guest set an invalid time; keeping the clock running as before"
                );
            }
        }
        self.cmos[usize::from(REG_B)] = value;
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (1, 1) => self.read_register(self.index),
            // The index port is write-only; like other undriven reads it
            // floats high.
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [v]) => self.index = v & INDEX_MASK,
            (1, [v]) => self.write_register(self.index, *v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    fn rd(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg | 0x80]); // with NMI mask bit, as Linux may send
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    fn wr(rtc: &mut Rtc, reg: u8, v: u8) {
        rtc.write(0, &[reg]);
        rtc.write(1, &[v]);
    }

    fn bcd(v: u8) -> u8 {
        (v >> 4) * 10 + (v & 0xf)
    }

    /// An RTC on a clock the test controls.
    fn fixed(secs: i64) -> (Rtc, Arc<AtomicI64>) {
        let t = Arc::new(AtomicI64::new(secs));
        let c = t.clone();
        (
            Rtc::with_clock(Box::new(move || c.load(Ordering::SeqCst))),
            t,
        )
    }

    /// Reads the full date as Linux does (BCD, 24h) into unix seconds.
    fn read_unix_bcd(rtc: &mut Rtc) -> i64 {
        let year =
            i64::from(bcd(rd(rtc, RTC_CENTURY_INDEX))) * 100 + i64::from(bcd(rd(rtc, REG_YEAR)));
        DateTime {
            year,
            month: bcd(rd(rtc, REG_MONTH)),
            day: bcd(rd(rtc, REG_DAY_OF_MONTH)),
            hour: bcd(rd(rtc, REG_HOURS)),
            minute: bcd(rd(rtc, REG_MINUTES)),
            second: bcd(rd(rtc, REG_SECONDS)),
        }
        .to_unix()
    }

    #[test]
    fn calendar_conversions() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
        assert_eq!(
            days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 28),
            1
        );
        for d in (-800_000..800_000).step_by(997) {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        // 2024-02-29T12:34:56Z, a Thursday.
        let t = DateTime::from_unix(1_709_210_096);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2024, 2, 29, 12, 34, 56)
        );
        assert_eq!(t.day_of_week(), 5);
        assert_eq!(t.to_unix(), 1_709_210_096);
    }

    #[test]
    fn bcd_registers_match_fixed_time() {
        let (mut rtc, _) = fixed(1_709_210_096); // 2024-02-29 12:34:56 Thu
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x56);
        assert_eq!(rd(&mut rtc, REG_MINUTES), 0x34);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x12);
        assert_eq!(rd(&mut rtc, REG_DAY_OF_WEEK), 0x05);
        assert_eq!(rd(&mut rtc, REG_DAY_OF_MONTH), 0x29);
        assert_eq!(rd(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(rd(&mut rtc, REG_YEAR), 0x24);
        assert_eq!(rd(&mut rtc, RTC_CENTURY_INDEX), 0x20);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let (mut rtc, _) = fixed(1_709_210_096 + 3600 * 3); // 15:34:56
        wr(&mut rtc, REG_B, B_BINARY | B_24H);
        assert_eq!(rd(&mut rtc, REG_HOURS), 15);
        assert_eq!(rd(&mut rtc, REG_SECONDS), 56);
        assert_eq!(rd(&mut rtc, REG_YEAR), 24);
        assert_eq!(rd(&mut rtc, RTC_CENTURY_INDEX), 20);
        wr(&mut rtc, REG_B, B_BINARY); // 12-hour binary
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x80 | 3);
        wr(&mut rtc, REG_B, 0); // 12-hour BCD
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x80 | 0x03);

        let (mut rtc, _) = fixed(days_from_civil(2024, 1, 1) * SECS_PER_DAY); // midnight
        wr(&mut rtc, REG_B, 0);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x12, "12 AM");
        let (mut rtc, _) = fixed(days_from_civil(2024, 1, 1) * SECS_PER_DAY + 12 * 3600);
        wr(&mut rtc, REG_B, 0);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x80 | 0x12, "12 PM");
    }

    #[test]
    fn follows_host_clock() {
        let mut rtc = Rtc::new();
        let host = host_unix_time();
        let guest = read_unix_bcd(&mut rtc);
        assert!((guest - host).abs() <= 2, "guest {guest} host {host}");
        let century = bcd(rd(&mut rtc, RTC_CENTURY_INDEX));
        assert_eq!(i64::from(century), DateTime::from_unix(host).year / 100);
    }

    #[test]
    fn status_registers() {
        let (mut rtc, _) = fixed(0);
        wr(&mut rtc, REG_A, 0xff);
        assert_eq!(rd(&mut rtc, REG_A) & A_UIP, 0, "UIP never set");
        assert_eq!(rd(&mut rtc, REG_A), 0x7f);
        assert_eq!(rd(&mut rtc, REG_B), B_24H, "24h BCD by default");
        assert_eq!(rd(&mut rtc, REG_C), 0);
        wr(&mut rtc, REG_D, 0);
        assert_eq!(rd(&mut rtc, REG_D) & D_VALID_RAM, D_VALID_RAM);
        wr(&mut rtc, 0x40, 0xab);
        assert_eq!(rd(&mut rtc, 0x40), 0xab);
        // Index bit 7 (NMI mask) is not part of the index.
        rtc.write(0, &[0x80 | 0x40]);
        let mut b = [0];
        rtc.read(1, &mut b);
        assert_eq!(b, [0xab]);
        assert!(rtc.set_cmos_byte(0x34, 0x12));
        assert_eq!(rd(&mut rtc, 0x34), 0x12);
        assert!(!rtc.set_cmos_byte(REG_SECONDS, 1));
        assert!(!rtc.set_cmos_byte(200, 1));
    }

    #[test]
    fn guest_sets_time_with_set_bit() {
        let (mut rtc, host) = fixed(1_709_210_096);
        // Linux mc146818_set_time: SET, write fields (BCD), clear SET.
        wr(&mut rtc, REG_B, B_24H | B_SET);
        wr(&mut rtc, REG_YEAR, 0x99);
        wr(&mut rtc, REG_MONTH, 0x12);
        wr(&mut rtc, REG_DAY_OF_MONTH, 0x31);
        wr(&mut rtc, REG_HOURS, 0x23);
        wr(&mut rtc, REG_MINUTES, 0x59);
        wr(&mut rtc, REG_SECONDS, 0x50);
        wr(&mut rtc, RTC_CENTURY_INDEX, 0x19);
        // Frozen while SET: reads return what was written.
        host.fetch_add(5, Ordering::SeqCst);
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x50);
        wr(&mut rtc, REG_B, B_24H);
        let set_to = DateTime {
            year: 1999,
            month: 12,
            day: 31,
            hour: 23,
            minute: 59,
            second: 50,
        }
        .to_unix();
        assert_eq!(read_unix_bcd(&mut rtc), set_to);
        // And it keeps running from there, across the century.
        host.fetch_add(15, Ordering::SeqCst);
        assert_eq!(read_unix_bcd(&mut rtc), set_to + 15);
        assert_eq!(rd(&mut rtc, RTC_CENTURY_INDEX), 0x20);
        assert_eq!(rd(&mut rtc, REG_YEAR), 0x00);
    }

    #[test]
    fn single_field_write_and_invalid_values() {
        let (mut rtc, _) = fixed(1_709_210_096);
        wr(&mut rtc, REG_MINUTES, 0x05);
        assert_eq!(rd(&mut rtc, REG_MINUTES), 0x05);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x12);
        // Invalid BCD / out-of-range values are ignored.
        wr(&mut rtc, REG_MINUTES, 0x6a);
        wr(&mut rtc, REG_MONTH, 0x13);
        wr(&mut rtc, REG_HOURS, 0x24);
        assert_eq!(rd(&mut rtc, REG_MINUTES), 0x05);
        assert_eq!(rd(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x12);
        // An invalid field during SET leaves the old time in place.
        let before = read_unix_bcd(&mut rtc);
        wr(&mut rtc, REG_B, B_24H | B_SET);
        wr(&mut rtc, REG_DAY_OF_MONTH, 0x00);
        wr(&mut rtc, REG_B, B_24H);
        assert_eq!(read_unix_bcd(&mut rtc), before);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut rtc, _) = fixed(0);
        rtc.write(0, &[REG_B, 0]);
        rtc.write(1, &[]);
        rtc.write(2, &[1]);
        rtc.write(u64::MAX, &[1]);
        let mut w = [0u8; 2];
        rtc.read(1, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        let mut b = [0u8];
        rtc.read(0, &mut b);
        assert_eq!(b, [0xff]);
        assert_eq!(rd(&mut rtc, REG_B), B_24H);
    }

    #[test]
    fn extreme_clock_values_do_not_panic() {
        for secs in [i64::MIN, i64::MIN / 2, -1, 0, i64::MAX / 2, i64::MAX] {
            let (mut rtc, _) = fixed(secs);
            for r in TIME_REGS {
                rd(&mut rtc, r);
                wr(&mut rtc, r, 0x09);
            }
            wr(&mut rtc, REG_B, B_24H | B_SET);
            wr(&mut rtc, REG_B, B_24H);
        }
    }
}
