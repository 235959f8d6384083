//! The 8254 programmable interval timer, plus the PC's port 0x61.
//!
//! Ports 0x40-0x42 are the data ports of channels 0-2 and 0x43 the
//! write-only control register. Channel 0's output drives ISA IRQ0;
//! channel 1 (DRAM refresh on old PCs) is modelled but wired to nothing;
//! channel 2's gate and output are bits 0 and 5 of port 0x61, which is how
//! Linux calibrates the TSC (`pit_calibrate_tsc` and `quick_pit_calibrate`
//! in arch/x86/kernel/tsc.c) and how the PC speaker is driven.
//!
//! # Time model
//!
//! The counters advance with virtual time: the number of input clock
//! pulses up to `now_ns` is `floor(now_ns * 1_193_182 / 10^9)`, so the
//! model is exact over any span with no accumulated rounding. As on the
//! chip, a count written to a counter is loaded on the *next* clock pulse,
//! so for mode 0 with count N the output rises N + 1 pulses after the
//! write. Nothing runs between calls: the caller passes `now_ns` on every
//! access, asks [`Pit::irq0_edges`] what happened, and uses
//! [`Pit::next_deadline_ns`] to know when to come back.
//!
//! # Deliberate simplifications
//!
//! - A new count written in modes 2 and 3 takes effect at once (the chip
//!   waits for the end of the current period); QEMU and KVM do the same.
//! - Mode 3 with an odd count uses the even-count waveform's counter
//!   sequence (the output timing, (N+1)/2 high then (N-1)/2 low, is exact).
//! - Port 0x61 bits 6-7 (IOCHK/SERR status) always read 0.

/// Input clock of the 8254 on a PC, in Hz.
pub const PIT_FREQ_HZ: u64 = 1_193_182;
/// First port (channel 0 data).
pub const PIT_BASE: u16 = 0x40;
/// Control word register.
pub const PIT_CONTROL: u16 = 0x43;
/// NMI status and control: channel 2 gate, speaker, channel 2 output.
pub const PORT_61: u16 = 0x61;

const NS_PER_SEC: u128 = 1_000_000_000;

/// Port 0x61 bits.
const P61_GATE2: u8 = 0x01;
const P61_WRITABLE: u8 = 0x0f;
const P61_REFRESH: u8 = 0x10;
const P61_OUT2: u8 = 0x20;
/// The refresh request bit toggles every 15.085 us on a PC; software
/// (old delay loops) only counts its flips.
const REFRESH_PERIOD_NS: u64 = 15_085;

/// Clock pulses up to `ns`.
fn tick_at(ns: u64) -> u64 {
    // At most 2^64 * 1.2e6 / 1e9, which fits in u64.
    u64::try_from(u128::from(ns) * u128::from(PIT_FREQ_HZ) / NS_PER_SEC).unwrap_or(u64::MAX)
}

/// The first time at which `tick_at` reaches `tick` (saturating).
fn ns_of_tick(tick: u64) -> u64 {
    let ns = (u128::from(tick) * NS_PER_SEC).div_ceil(u128::from(PIT_FREQ_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// How a counter's 16-bit value moves over the 8-bit data port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Lsb,
    Msb,
    LsbMsb,
}

impl Access {
    /// The RW field of the control word (0 is the latch command).
    fn bits(self) -> u8 {
        match self {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::LsbMsb => 3,
        }
    }
}

/// Where a counter is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CountState {
    /// A control word was written and no count yet: the counter is idle
    /// and the output holds the level the control word set.
    Unprogrammed,
    /// Modes 1 and 5: count written, waiting for a rising gate.
    WaitTrigger,
    /// Counting: the counter held the initial count at clock pulse `start`.
    Running { start: u64 },
    /// Gate low in modes 0, 2, 3, 4: counting suspended after `elapsed`
    /// pulses.
    Paused { elapsed: u64 },
}

#[derive(Debug, Clone)]
struct Channel {
    mode: u8,
    bcd: bool,
    access: Access,
    /// Initial count in effect, 1..=65536 (1..=10000 in BCD).
    reload: u64,
    /// LSB of a two-byte count write, waiting for its MSB.
    pending_lsb: Option<u8>,
    /// Next LsbMsb read returns the MSB.
    read_msb_next: bool,
    /// Output of the counter latch command, until read.
    count_latch: Option<u16>,
    /// Output of the read-back status command, until read.
    status_latch: Option<u8>,
    gate: bool,
    /// Status bit 6: a count was written but not yet loaded.
    null_count: bool,
    state: CountState,
}

impl Channel {
    fn new(gate: bool) -> Self {
        // Power-on state is undefined on the chip; we pick an idle mode 3
        // counter with its output high (what a BIOS leaves, minus the
        // running count) so the first mode 2 programming does not produce
        // a spurious rising edge.
        Self {
            mode: 3,
            bcd: false,
            access: Access::LsbMsb,
            reload: 0x1_0000,
            pending_lsb: None,
            read_msb_next: false,
            count_latch: None,
            status_latch: None,
            gate,
            null_count: true,
            state: CountState::Unprogrammed,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    /// Pulses counted since the count was loaded, at pulse `now`.
    fn elapsed(&self, now: u64) -> Option<u64> {
        match self.state {
            CountState::Running { start } => Some(now.saturating_sub(start)),
            CountState::Paused { elapsed } => Some(elapsed),
            CountState::Unprogrammed | CountState::WaitTrigger => None,
        }
    }

    /// The counting element's value at pulse `now` (binary, 0..modulus).
    fn count(&self, now: u64) -> u64 {
        let n = self.reload;
        let Some(d) = self.elapsed(now) else {
            return n % self.modulus();
        };
        let value = match self.mode {
            2 => n - d % n,
            // Decrements by two, reloading every half period.
            3 => n - (d.wrapping_mul(2)) % n,
            // Modes 0, 1, 4, 5 wrap around after terminal count.
            _ => {
                let m = self.modulus();
                (n % m + m - d % m) % m
            }
        };
        value % self.modulus()
    }

    /// The OUT pin at pulse `now`.
    fn output(&self, now: u64) -> bool {
        let n = self.reload;
        let d = match self.state {
            // A control word sets OUT low in mode 0 and high otherwise.
            CountState::Unprogrammed => return self.mode != 0,
            CountState::WaitTrigger => return true,
            // Gate low forces OUT high in modes 2 and 3.
            CountState::Paused { .. } if matches!(self.mode, 2 | 3) => return true,
            CountState::Paused { elapsed } => elapsed,
            CountState::Running { start } => now.saturating_sub(start),
        };
        match self.mode {
            0 | 1 => d >= n,
            2 => n < 2 || d % n != n - 1,
            3 => d % n < n.div_ceil(2),
            // Modes 4 and 5: a one-pulse low strobe at terminal count.
            _ => d != n,
        }
    }

    /// Rising OUT edges at pulses in `(from, to]`, with the state fixed.
    fn rising_edges(&self, from: u64, to: u64) -> u64 {
        let CountState::Running { start } = self.state else {
            return 0;
        };
        if to <= from {
            return 0;
        }
        let n = self.reload;
        let d_from = from.saturating_sub(start);
        let d_to = to.saturating_sub(start);
        match self.mode {
            // Periodic: OUT rises whenever the counter reloads.
            2 | 3 if n >= 2 => d_to / n - d_from / n,
            2 | 3 => 0,
            // One shot: OUT rises once, at terminal count (modes 0, 1) or
            // one pulse after it (modes 4, 5).
            _ => {
                let edge = if matches!(self.mode, 0 | 1) { n } else { n + 1 };
                u64::from(d_from < edge && edge <= d_to)
            }
        }
    }

    /// The first pulse after `now` at which OUT rises, if any.
    fn next_rising_edge(&self, now: u64) -> Option<u64> {
        let CountState::Running { start } = self.state else {
            return None;
        };
        let n = self.reload;
        let d_now = now.saturating_sub(start);
        let d_edge = match self.mode {
            2 | 3 if n >= 2 => (d_now / n + 1).checked_mul(n)?,
            2 | 3 => return None,
            0 | 1 => n,
            _ => n + 1,
        };
        let edge = start.checked_add(d_edge)?;
        (edge > now).then_some(edge)
    }

    fn write_control(&mut self, value: u8) {
        self.access = match (value >> 4) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::LsbMsb,
        };
        let mode = (value >> 1) & 7;
        // Modes 6 and 7 are aliases of 2 and 3.
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.bcd = value & 1 != 0;
        self.pending_lsb = None;
        self.read_msb_next = false;
        self.count_latch = None;
        self.status_latch = None;
        self.null_count = true;
        self.state = CountState::Unprogrammed;
    }

    fn write_data(&mut self, value: u8, now: u64) {
        let raw = match (self.access, self.pending_lsb.take()) {
            (Access::Lsb, _) => u16::from(value),
            (Access::Msb, _) => u16::from(value) << 8,
            (Access::LsbMsb, None) => {
                self.pending_lsb = Some(value);
                if self.mode == 0 {
                    // Mode 0: the first byte stops the count and drops OUT.
                    self.state = CountState::Unprogrammed;
                }
                return;
            }
            (Access::LsbMsb, Some(lsb)) => u16::from(lsb) | (u16::from(value) << 8),
        };
        self.load(raw, now);
    }

    /// A complete count was written at pulse `now`.
    fn load(&mut self, raw: u16, now: u64) {
        let value = if self.bcd {
            from_bcd(raw)
        } else {
            u64::from(raw)
        };
        // 0 is the largest count: 2^16 binary, 10^4 BCD.
        self.reload = if value == 0 { self.modulus() } else { value };
        self.null_count = false;
        self.state = match self.mode {
            // Gate-triggered modes count only after the next rising gate
            // (a new count during a cycle also waits for a trigger).
            1 | 5 => CountState::WaitTrigger,
            _ if !self.gate => CountState::Paused { elapsed: 0 },
            // Loaded on the next clock pulse.
            _ => CountState::Running {
                start: now.saturating_add(1),
            },
        };
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        self.state = match (self.state, gate, self.mode) {
            // Rising gate: triggers modes 1/5 and restarts modes 2/3.
            (CountState::WaitTrigger | CountState::Running { .. }, true, 1 | 5)
            | (CountState::Paused { .. }, true, 2 | 3) => CountState::Running {
                start: now.saturating_add(1),
            },
            // Modes 0/4 resume where they stopped.
            (CountState::Paused { elapsed }, true, _) => CountState::Running {
                start: now.saturating_sub(elapsed),
            },
            // Falling gate suspends modes 0, 2, 3, 4.
            (CountState::Running { start }, false, 0 | 2 | 3 | 4) => CountState::Paused {
                elapsed: now.saturating_sub(start),
            },
            (state, _, _) => state,
        };
    }

    fn latch_count(&mut self, now: u64) {
        // Further latch commands are ignored until the latch is read.
        if self.count_latch.is_none() {
            self.count_latch = Some(self.encoded_count(now));
            self.read_msb_next = false;
        }
    }

    fn latch_status(&mut self, now: u64) {
        if self.status_latch.is_none() {
            let status = (u8::from(self.output(now)) << 7)
                | (u8::from(self.null_count) << 6)
                | (self.access.bits() << 4)
                | (self.mode << 1)
                | u8::from(self.bcd);
            self.status_latch = Some(status);
        }
    }

    fn encoded_count(&self, now: u64) -> u16 {
        let count = self.count(now);
        if self.bcd {
            to_bcd(count)
        } else {
            // count < 2^16 by construction of `count`.
            u16::try_from(count).unwrap_or(0)
        }
    }

    fn read_data(&mut self, now: u64) -> u8 {
        if let Some(status) = self.status_latch.take() {
            return status;
        }
        let (value, latched) = match self.count_latch {
            Some(v) => (v, true),
            None => (self.encoded_count(now), false),
        };
        let [lsb, msb] = value.to_le_bytes();
        let (byte, done) = match self.access {
            Access::Lsb => (lsb, true),
            Access::Msb => (msb, true),
            Access::LsbMsb => {
                let msb_now = self.read_msb_next;
                self.read_msb_next = !msb_now;
                if msb_now {
                    (msb, true)
                } else {
                    (lsb, false)
                }
            }
        };
        if latched && done {
            self.count_latch = None;
        }
        byte
    }
}

/// Four BCD digits to binary; nibbles above 9 are taken at face value and
/// the result folded into range rather than rejected (the chip's behaviour
/// with such counts is undefined, ours must only be harmless).
fn from_bcd(raw: u16) -> u64 {
    let d = |shift: u16| u64::from((raw >> shift) & 0xf);
    (d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)) % 10_000
}

fn to_bcd(value: u64) -> u16 {
    let v = value % 10_000;
    let digit = |div: u64| u16::try_from((v / div) % 10).unwrap_or(0);
    (digit(1000) << 12) | (digit(100) << 8) | (digit(10) << 4) | digit(1)
}

/// The 8254 with its three channels and port 0x61.
#[derive(Debug, Clone)]
pub struct Pit {
    channels: [Channel; 3],
    /// Writable bits of port 0x61 (gate 2, speaker data, check enables).
    port61: u8,
    /// Channel 0 rising edges before `irq_tick` are already counted.
    irq_tick: u64,
    /// Edges counted but not yet returned by [`Pit::irq0_edges`].
    pending_edges: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT with all channels idle; channels 0 and 1 have their gates tied
    /// high, channel 2's gate is port 0x61 bit 0 (initially low).
    pub fn new() -> Self {
        Self {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
            irq_tick: 0,
            pending_edges: 0,
        }
    }

    /// Whether `port` belongs to the PIT (0x40-0x43, 0x61).
    pub fn handles_port(port: u16) -> bool {
        matches!(port, PIT_BASE..=PIT_CONTROL | PORT_61)
    }

    /// Guest `IN` from `port` at `now_ns`. The control register is
    /// write-only and reads 0 (as in KVM); foreign ports read 0xff.
    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        let now = tick_at(now_ns);
        match port {
            PIT_BASE..=0x42 => self.channels[usize::from(port - PIT_BASE)].read_data(now),
            PIT_CONTROL => 0,
            PORT_61 => {
                let refresh = if (now_ns / REFRESH_PERIOD_NS) % 2 == 1 {
                    P61_REFRESH
                } else {
                    0
                };
                let out2 = if self.channels[2].output(now) {
                    P61_OUT2
                } else {
                    0
                };
                self.port61 | refresh | out2
            }
            _ => 0xff,
        }
    }

    /// Guest `OUT` to `port` at `now_ns`; foreign ports are ignored.
    pub fn write(&mut self, port: u16, value: u8, now_ns: u64) {
        let now = tick_at(now_ns);
        match port {
            PIT_BASE..=0x42 => {
                let index = usize::from(port - PIT_BASE);
                self.change_channel(index, now, |c| c.write_data(value, now));
            }
            PIT_CONTROL => self.write_control(value, now),
            PORT_61 => {
                self.port61 = value & P61_WRITABLE;
                let gate = value & P61_GATE2 != 0;
                self.channels[2].set_gate(gate, now);
            }
            _ => {}
        }
    }

    fn write_control(&mut self, value: u8, now: u64) {
        let select = value >> 6;
        if select == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches
            // status, bits 3..1 select channels 2..0.
            for index in 0..3 {
                if value & (2 << index) == 0 {
                    continue;
                }
                let channel = &mut self.channels[index];
                if value & 0x20 == 0 {
                    channel.latch_count(now);
                }
                if value & 0x10 == 0 {
                    channel.latch_status(now);
                }
            }
            return;
        }
        let index = usize::from(select);
        if (value >> 4) & 3 == 0 {
            self.channels[index].latch_count(now);
        } else {
            self.change_channel(index, now, |c| c.write_control(value));
        }
    }

    /// Applies a change to a channel's configuration at pulse `now`. For
    /// channel 0 the IRQ0 edges of the old configuration are counted first,
    /// and a rising edge caused by the change itself (a control word
    /// setting OUT high) is counted too.
    fn change_channel(&mut self, index: usize, now: u64, change: impl FnOnce(&mut Channel)) {
        if index != 0 {
            change(&mut self.channels[index]);
            return;
        }
        self.collect_edges(now);
        let before = self.channels[0].output(now);
        change(&mut self.channels[0]);
        if !before && self.channels[0].output(now) {
            self.pending_edges = self.pending_edges.saturating_add(1);
        }
    }

    fn collect_edges(&mut self, now: u64) {
        let edges = self.channels[0].rising_edges(self.irq_tick, now);
        self.pending_edges = self.pending_edges.saturating_add(edges);
        self.irq_tick = self.irq_tick.max(now);
    }

    /// Rising edges of channel 0's output (IRQ0) since the previous call.
    /// The caller pulses IRQ0 that many times (an edge-triggered PIC input
    /// coalesces them unless the guest acknowledges in between, exactly as
    /// on hardware, so pulsing once when the count is nonzero is also fine).
    pub fn irq0_edges(&mut self, now_ns: u64) -> u64 {
        self.collect_edges(tick_at(now_ns));
        std::mem::take(&mut self.pending_edges)
    }

    /// When channel 0's output next rises after `now_ns` (so IRQ0 is due),
    /// or `now_ns` itself if edges are waiting to be collected by
    /// [`Pit::irq0_edges`]; `None` if no edge is coming.
    pub fn next_deadline_ns(&self, now_ns: u64) -> Option<u64> {
        let now = tick_at(now_ns);
        if self.pending_edges > 0 || self.channels[0].rising_edges(self.irq_tick, now) > 0 {
            return Some(now_ns);
        }
        self.channels[0]
            .next_rising_edge(now)
            .map(|tick| ns_of_tick(tick).max(now_ns))
    }

    /// The OUT pin of `channel` (0..=2) at `now_ns`; false for others.
    pub fn output(&self, channel: usize, now_ns: u64) -> bool {
        self.channels
            .get(channel)
            .is_some_and(|c| c.output(tick_at(now_ns)))
    }

    /// Whether the PC speaker is sounding channel 2 (port 0x61 bits 0-1).
    pub fn speaker_enabled(&self) -> bool {
        self.port61 & 0x03 == 0x03
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One PIT pulse in ns (838.1 ns).
    const TICK_NS: f64 = 1e9 / PIT_FREQ_HZ as f64;

    fn ns(ticks: u64) -> u64 {
        ns_of_tick(ticks)
    }

    fn read16(pit: &mut Pit, port: u16, now: u64) -> u16 {
        let lo = pit.read(port, now);
        let hi = pit.read(port, now);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn tick_conversion_round_trips() {
        for t in [0u64, 1, 2, 1000, 1_193_182, 123_456_789] {
            assert_eq!(tick_at(ns_of_tick(t)), t);
            if t > 0 {
                assert_eq!(tick_at(ns_of_tick(t) - 1), t - 1);
            }
        }
        assert!((ns(1_000_000) as f64 - 1e6 * TICK_NS).abs() < 1.0);
    }

    #[test]
    fn mode0_counts_down_and_raises_out_once() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0x30, 0); // ch0, lohi, mode 0
        assert!(!pit.output(0, 0));
        pit.write(0x40, 100, 0);
        pit.write(0x40, 0, 0);
        // Loaded on the next pulse.
        assert_eq!(read16(&mut pit, 0x40, ns(1)), 100);
        assert_eq!(read16(&mut pit, 0x40, ns(11)), 90);
        assert!(!pit.output(0, ns(100)));
        assert!(pit.output(0, ns(101)));
        assert_eq!(pit.next_deadline_ns(0), Some(ns(101)));
        assert_eq!(pit.irq0_edges(ns(100)), 0);
        assert_eq!(pit.irq0_edges(ns(101)), 1);
        // Keeps counting (wrapping) with OUT high, no further edges.
        assert_eq!(read16(&mut pit, 0x40, ns(102)), 0xffff);
        assert_eq!(pit.irq0_edges(ns(200_000)), 0);
        assert_eq!(pit.next_deadline_ns(ns(200_000)), None);
    }

    #[test]
    fn mode0_first_byte_stops_count() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0x30, 0);
        pit.write(0x40, 10, 0);
        pit.write(0x40, 0, 0);
        assert!(pit.output(0, ns(20)));
        pit.write(0x40, 50, ns(20));
        assert!(!pit.output(0, ns(30)), "LSB write drops OUT");
        pit.write(0x40, 0, ns(30));
        assert!(pit.output(0, ns(81)));
    }

    #[test]
    fn mode2_rate_generator_periodic_irq0() {
        // Linux's PIT clockevent periodic mode (`pit_set_periodic`,
        // drivers/clocksource/i8253.c): 0x34 then LATCH lo/hi, with
        // LATCH = (PIT_TICK_RATE + HZ/2) / HZ; HZ = 1000 -> 1193.
        let mut pit = Pit::new();
        let latch: u16 = 1193;
        pit.write(PIT_CONTROL, 0x34, 0);
        pit.write(0x40, (latch & 0xff) as u8, 0);
        pit.write(0x40, (latch >> 8) as u8, 0);
        // Counter runs latch..1 and reloads.
        assert_eq!(read16(&mut pit, 0x40, ns(1)), 1193);
        assert_eq!(read16(&mut pit, 0x40, ns(1 + 1192)), 1);
        assert_eq!(read16(&mut pit, 0x40, ns(1 + 1193)), 1193);
        // OUT low for exactly one pulse per period.
        assert!(pit.output(0, ns(1 + 1191)));
        assert!(!pit.output(0, ns(1 + 1192)));
        assert!(pit.output(0, ns(1 + 1193)));
        // One IRQ0 edge per period: one second gives ~1000.
        let one_second = 1_000_000_000;
        let edges = pit.irq0_edges(one_second);
        assert_eq!(edges, (tick_at(one_second) - 1) / 1193);
        assert_eq!(edges, 1000);
        // The next deadline is the next period boundary.
        let next = pit.next_deadline_ns(one_second).unwrap();
        assert_eq!(tick_at(next), 1 + 1001 * 1193);
        assert_eq!(pit.irq0_edges(next - 1), 0);
        assert_eq!(pit.irq0_edges(next), 1);
        // Pacing by next_deadline_ns yields one edge per call.
        let mut now = next;
        for _ in 0..50 {
            now = pit.next_deadline_ns(now).unwrap();
            assert_eq!(pit.irq0_edges(now), 1);
        }
    }

    #[test]
    fn mode3_square_wave() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0x36, 0); // ch0, lohi, mode 3
        pit.write(0x40, 10, 0);
        pit.write(0x40, 0, 0);
        // High for 5 pulses, low for 5, counter decrementing by two.
        let outs: Vec<bool> = (1..=11).map(|t| pit.output(0, ns(t))).collect();
        assert_eq!(
            outs,
            [true, true, true, true, true, false, false, false, false, false, true]
        );
        assert_eq!(read16(&mut pit, 0x40, ns(1)), 10);
        assert_eq!(read16(&mut pit, 0x40, ns(2)), 8);
        assert_eq!(read16(&mut pit, 0x40, ns(6)), 10);
        assert_eq!(read16(&mut pit, 0x40, ns(7)), 8);
        assert_eq!(pit.irq0_edges(ns(1 + 100)), 10);
        // Odd count: high (N+1)/2, low (N-1)/2.
        pit.write(PIT_CONTROL, 0x36, ns(200));
        pit.write(0x40, 5, ns(200));
        pit.write(0x40, 0, ns(200));
        let s = tick_at(ns(200)) + 1;
        let outs: Vec<bool> = (0..5).map(|t| pit.output(0, ns(s + t))).collect();
        assert_eq!(outs, [true, true, true, false, false]);
    }

    #[test]
    fn mode4_software_strobe() {
        // Linux's oneshot clockevent (`pit_set_oneshot` writes 0x38, then
        // `pit_next_event` the delta lo/hi).
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0x38, 0);
        assert!(pit.output(0, 0));
        pit.write(0x40, 50, 0);
        pit.write(0x40, 0, 0);
        assert!(pit.output(0, ns(50)));
        assert!(!pit.output(0, ns(51)), "strobe at terminal count");
        assert!(pit.output(0, ns(52)));
        assert_eq!(pit.next_deadline_ns(0), Some(ns(52)));
        assert_eq!(pit.irq0_edges(ns(1000)), 1);
        assert_eq!(pit.next_deadline_ns(ns(1000)), None);
    }

    #[test]
    fn reload_zero_means_65536() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0x34, 0);
        pit.write(0x40, 0, 0);
        pit.write(0x40, 0, 0);
        assert_eq!(read16(&mut pit, 0x40, ns(1)), 0);
        assert_eq!(read16(&mut pit, 0x40, ns(2)), 0xffff);
        assert_eq!(pit.irq0_edges(ns(1 + 65536)), 1);
        // BCD: 0 means 10000.
        pit.write(PIT_CONTROL, 0x35, ns(1_000_000));
        pit.write(0x40, 0, ns(1_000_000));
        pit.write(0x40, 0, ns(1_000_000));
        let s = tick_at(ns(1_000_000)) + 1;
        assert_eq!(read16(&mut pit, 0x40, ns(s + 1)), 0x9999);
        assert_eq!(read16(&mut pit, 0x40, ns(s + 10)), 0x9990);
    }

    #[test]
    fn lsb_only_and_msb_only_access() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0x10, 0); // ch0 LSB only, mode 0
        pit.write(0x40, 200, 0);
        assert_eq!(pit.read(0x40, ns(1)), 200);
        assert_eq!(pit.read(0x40, ns(101)), 100);
        pit.write(PIT_CONTROL, 0x20, 0); // MSB only
        pit.write(0x40, 2, 0);
        assert_eq!(pit.read(0x40, ns(1)), 2);
        assert_eq!(pit.read(0x40, ns(2)), 1, "0x200 - 1 = 0x1ff");
    }

    #[test]
    fn counter_latch_freezes_value_until_read() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0xb4, 0); // ch2, lohi, mode 2
        pit.write(0x61, 0x01, 0); // gate 2 high
        pit.write(0x42, 0x00, 0);
        pit.write(0x42, 0x10, 0); // 0x1000
        pit.write(0x61, 0x01, 0);
        pit.write(PIT_CONTROL, 0x80, ns(0x101)); // latch ch2
        pit.write(PIT_CONTROL, 0x80, ns(0x200)); // ignored: latch pending
        assert_eq!(pit.read(0x42, ns(0x500)), 0x00);
        assert_eq!(pit.read(0x42, ns(0x600)), 0x0f);
        // Latch released: live value again.
        assert_eq!(read16(&mut pit, 0x42, ns(0x801)), 0x0800);
    }

    #[test]
    fn read_back_status_and_count() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0x30, 0); // ch0 lohi mode 0
        pit.write(0x40, 0x34, 0);
        pit.write(0x40, 0x12, 0);
        // Read-back ch0: latch count and status (bits 5 and 4 clear).
        pit.write(PIT_CONTROL, 0xc2, ns(0x11));
        // Status first: OUT low, null count clear, RW=3, mode 0, binary.
        assert_eq!(pit.read(0x40, ns(0x100)), 0x30);
        assert_eq!(read16(&mut pit, 0x40, ns(0x200)), 0x1224);
        // Status only, after terminal count.
        pit.write(PIT_CONTROL, 0xe2, ns(0x2000));
        assert_eq!(pit.read(0x40, ns(0x2000)), 0xb0);
        // Null count is set by a control word until a count is written.
        pit.write(PIT_CONTROL, 0x34, ns(0x2000));
        pit.write(PIT_CONTROL, 0xe2, ns(0x2000));
        assert_eq!(pit.read(0x40, ns(0x2000)), 0xf4);
    }

    #[test]
    fn channel2_gate_via_port61() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0xb0, 0); // ch2, lohi, mode 0
        pit.write(0x42, 100, 0);
        pit.write(0x42, 0, 0);
        // Gate low: not counting.
        assert_eq!(read16(&mut pit, 0x42, ns(50)), 100);
        assert_eq!(pit.read(0x61, ns(50)) & 0x20, 0);
        pit.write(0x61, 0x01, ns(50));
        assert_eq!(read16(&mut pit, 0x42, ns(60)), 90);
        // Gate low again pauses, high resumes.
        pit.write(0x61, 0x00, ns(60));
        assert_eq!(read16(&mut pit, 0x42, ns(1000)), 90);
        pit.write(0x61, 0x01, ns(1000));
        assert_eq!(pit.read(0x61, ns(1089)) & 0x21, 0x01);
        assert_eq!(pit.read(0x61, ns(1090)) & 0x21, 0x21);
        // Writable bits read back; refresh toggles.
        pit.write(0x61, 0x03, ns(2000));
        assert!(pit.speaker_enabled());
        let a = pit.read(0x61, 0) & 0x10;
        let b = pit.read(0x61, REFRESH_PERIOD_NS) & 0x10;
        assert_ne!(a, b);
        // Channel 2 never produces IRQ0.
        assert_eq!(pit.irq0_edges(ns(100_000)), 0);
    }

    #[test]
    fn mode2_gate_low_forces_out_high_and_reloads() {
        let mut pit = Pit::new();
        pit.write(0x61, 0x01, 0);
        pit.write(PIT_CONTROL, 0xb4, 0);
        pit.write(0x42, 10, 0);
        pit.write(0x42, 0, 0);
        assert!(!pit.output(2, ns(10)));
        pit.write(0x61, 0x00, ns(10));
        assert!(pit.output(2, ns(10)));
        pit.write(0x61, 0x01, ns(20));
        assert_eq!(read16(&mut pit, 0x42, ns(21)), 10, "restarted from the top");
    }

    #[test]
    fn mode1_triggered_by_gate() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0xb2, 0); // ch2 lohi mode 1
        pit.write(0x42, 20, 0);
        pit.write(0x42, 0, 0);
        assert!(pit.output(2, ns(100)));
        pit.write(0x61, 0x01, ns(100));
        let s = tick_at(ns(100)) + 1;
        assert!(!pit.output(2, ns(s)));
        assert!(pit.output(2, ns(s + 20)));
    }

    #[test]
    fn reprogramming_keeps_past_edges() {
        let mut pit = Pit::new();
        pit.write(PIT_CONTROL, 0x34, 0);
        pit.write(0x40, 100, 0);
        pit.write(0x40, 0, 0);
        // Ten periods pass unobserved, then the guest reprograms.
        pit.write(PIT_CONTROL, 0x34, ns(1 + 1000));
        pit.write(0x40, 200, ns(1 + 1000));
        pit.write(0x40, 0, ns(1 + 1000));
        assert_eq!(pit.irq0_edges(ns(1 + 1000)), 10);
        let s = tick_at(ns(1 + 1000)) + 1;
        assert_eq!(pit.irq0_edges(ns(s + 400)), 2);
    }

    /// Simulated guest CPU for the calibration tests: every port access
    /// costs `io_ns` of virtual time, and the TSC runs at `tsc_hz`.
    struct Cpu {
        pit: Pit,
        now_ns: u64,
        io_ns: u64,
        tsc_hz: u64,
    }

    impl Cpu {
        fn inb(&mut self, port: u16) -> u8 {
            self.now_ns += self.io_ns;
            self.pit.read(port, self.now_ns)
        }
        fn outb(&mut self, value: u8, port: u16) {
            self.now_ns += self.io_ns;
            self.pit.write(port, value, self.now_ns);
        }
        fn get_cycles(&mut self) -> u64 {
            self.now_ns += 20;
            (u128::from(self.now_ns) * u128::from(self.tsc_hz) / 1_000_000_000) as u64
        }
    }

    /// `pit_calibrate_tsc(latch, ms, loopmin)` from arch/x86/kernel/tsc.c:
    /// channel 2 in mode 0 with the gate set via port 0x61, polling port
    /// 0x61 bit 5 until OUT rises. Returns kHz or None on failure.
    fn pit_calibrate_tsc(cpu: &mut Cpu, latch: u32, ms: u64, loopmin: u32) -> Option<u64> {
        let v = cpu.inb(0x61);
        cpu.outb((v & !0x02) | 0x01, 0x61);
        cpu.outb(0xb0, 0x43);
        cpu.outb((latch & 0xff) as u8, 0x42);
        cpu.outb((latch >> 8) as u8, 0x42);
        let t1 = cpu.get_cycles();
        let (mut tsc, mut t2) = (t1, t1);
        let (mut pitcnt, mut tscmin, mut tscmax) = (0u32, u64::MAX, 0u64);
        while cpu.inb(0x61) & 0x20 == 0 {
            t2 = cpu.get_cycles();
            let delta = t2 - tsc;
            tsc = t2;
            tscmin = tscmin.min(delta);
            tscmax = tscmax.max(delta);
            pitcnt += 1;
        }
        if pitcnt < loopmin || tscmax > 10 * tscmin {
            return None;
        }
        Some((t2 - t1) / ms)
    }

    #[test]
    fn linux_pit_calibrate_tsc() {
        // CAL_MS = 10, CAL_LATCH = PIT_TICK_RATE / (1000 / CAL_MS),
        // CAL_PIT_LOOPS = 1000 (native_calibrate_tsc / pit_hpet_ptimer_calibrate_cpu).
        for tsc_hz in [1_000_000_000u64, 2_345_678_000, 3_000_000_000] {
            let mut cpu = Cpu {
                pit: Pit::new(),
                now_ns: 5_000_000,
                io_ns: 1000,
                tsc_hz,
            };
            let latch = (PIT_FREQ_HZ / (1000 / 10)) as u32;
            let khz = pit_calibrate_tsc(&mut cpu, latch, 10, 1000).expect("calibration");
            let want = tsc_hz / 1000;
            let err = (khz as f64 - want as f64).abs() / want as f64;
            assert!(err < 2e-3, "tsc {tsc_hz}: got {khz} kHz, want {want}");
        }
    }

    fn pit_verify_msb(cpu: &mut Cpu, val: u8) -> bool {
        cpu.inb(0x42); // ignore LSB
        cpu.inb(0x42) == val
    }

    fn pit_expect_msb(cpu: &mut Cpu, val: u8) -> (bool, u64, u64) {
        let (mut tsc, mut prev_tsc) = (0u64, 0u64);
        let mut count = 0;
        while count < 50000 {
            if !pit_verify_msb(cpu, val) {
                break;
            }
            prev_tsc = tsc;
            tsc = cpu.get_cycles();
            count += 1;
        }
        let delta = cpu.get_cycles() - prev_tsc;
        (count > 5, tsc, delta)
    }

    /// `quick_pit_calibrate` (arch/x86/kernel/tsc.c): channel 2, mode 0,
    /// count 0xffff, watching the MSB of the live count go down one step
    /// per 256 PIT pulses, until the TSC error is below 500 ppm.
    fn quick_pit_calibrate(cpu: &mut Cpu) -> Option<u64> {
        const MAX_QUICK_PIT_MS: u64 = 50;
        const MAX_ITER: u64 = MAX_QUICK_PIT_MS * PIT_FREQ_HZ / 1000 / 256;
        let v = cpu.inb(0x61);
        cpu.outb((v & !0x02) | 0x01, 0x61);
        cpu.outb(0xb0, 0x43);
        cpu.outb(0xff, 0x42);
        cpu.outb(0xff, 0x42);
        pit_verify_msb(cpu, 0);
        let (ok, tsc, d1) = pit_expect_msb(cpu, 0xff);
        if !ok {
            return None;
        }
        for i in 1..=MAX_ITER {
            let (ok, t, d2) = pit_expect_msb(cpu, (0xff - i) as u8);
            if !ok {
                return None;
            }
            let delta = t - tsc;
            if i == 1 && d1 + d2 >= (delta * MAX_ITER) >> 11 {
                return None;
            }
            if d1 + d2 >= delta >> 11 {
                continue;
            }
            if !pit_verify_msb(cpu, (0xfe - i) as u8) {
                return None;
            }
            return Some(delta * PIT_FREQ_HZ / (i * 256 * 1000));
        }
        None
    }

    #[test]
    fn linux_quick_pit_calibrate() {
        for tsc_hz in [1_000_000_000u64, 2_100_000_000, 3_600_000_000] {
            let mut cpu = Cpu {
                pit: Pit::new(),
                now_ns: 123_456,
                io_ns: 1000,
                tsc_hz,
            };
            let khz = quick_pit_calibrate(&mut cpu).expect("quick calibration");
            let want = tsc_hz / 1000;
            let err = (khz as f64 - want as f64).abs() / want as f64;
            assert!(err < 5e-4, "tsc {tsc_hz}: got {khz} kHz, want {want}");
        }
    }

    #[test]
    fn foreign_ports_are_inert() {
        let mut pit = Pit::new();
        assert_eq!(pit.read(0x44, 0), 0xff);
        pit.write(0x44, 0x12, 0);
        assert_eq!(pit.read(0x43, 0), 0);
        assert!(Pit::handles_port(0x61) && !Pit::handles_port(0x60));
    }
}
