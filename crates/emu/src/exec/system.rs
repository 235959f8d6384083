//! Protection and events: descriptor loads with their checks, exception
//! and interrupt delivery through the IVT/IDT, far transfers, IRET,
//! SYSCALL/SYSRET and the external-interrupt request lines.
//!
//! Follows the Intel SDM Vol. 3A ch. 5-6 and the Vol. 2 pseudo-code of
//! INT n/IRET/far JMP/CALL/RET. Not modelled: task gates and task
//! switches, call gates, virtual-8086 mode, segment limit checks, and
//! setting descriptor accessed bits (returned as `InternalError` or
//! #GP where noted).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use hypervisor::x86::Segment;

use super::{Core, Exception, Exit, Stop};
use crate::state::rflags::{AC, IF, NT, RF, TF, VM};
use crate::state::{bits, seg};

/// Interrupt requests for one vCPU, set by other threads (the future
/// interrupt controllers, or a VMM directly) and taken by the vCPU
/// between blocks.
#[derive(Debug, Default)]
pub struct InterruptLines {
    pending: [AtomicU64; 4],
    nmi: AtomicBool,
    /// Any request pending: the one load the block loop makes.
    any: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl InterruptLines {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests external interrupt `vector` (delivered when RFLAGS.IF = 1
    /// and no interrupt shadow is in force; highest vector first).
    pub fn request(&self, vector: u8) {
        self.pending[usize::from(vector >> 6)].fetch_or(1 << (vector & 63), Ordering::SeqCst);
        self.any.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Requests an NMI (delivered unless an NMI handler is running).
    pub fn request_nmi(&self) {
        self.nmi.store(true, Ordering::SeqCst);
        self.any.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Wakes a vCPU waiting in HLT so it re-checks its requests and stop
    /// flag.
    pub fn kick(&self) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }

    /// The flag [`Self::any`] loads, for blocks' code (see
    /// `native::Control::SetIf`).
    pub(crate) fn any_flag(&self) -> *const AtomicBool {
        &self.any
    }

    #[inline(always)]
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    fn refresh_any(&self) {
        self.any.store(false, Ordering::SeqCst);
        let more = self.nmi.load(Ordering::SeqCst)
            || self.pending.iter().any(|w| w.load(Ordering::SeqCst) != 0);
        if more {
            self.any.store(true, Ordering::SeqCst);
        }
    }

    pub(crate) fn has_interrupt(&self) -> bool {
        self.pending.iter().any(|w| w.load(Ordering::SeqCst) != 0)
    }

    pub(crate) fn has_nmi(&self) -> bool {
        self.nmi.load(Ordering::SeqCst)
    }

    pub(crate) fn take_nmi(&self) -> bool {
        let r = self.nmi.swap(false, Ordering::SeqCst);
        self.refresh_any();
        r
    }

    /// Takes the highest pending vector.
    pub(crate) fn take_interrupt(&self) -> Option<u8> {
        for w in (0..4).rev() {
            let mut cur = self.pending[w].load(Ordering::SeqCst);
            while cur != 0 {
                let bit = 63 - cur.leading_zeros();
                match self.pending[w].compare_exchange(
                    cur,
                    cur & !(1u64 << bit),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => {
                        self.refresh_any();
                        return Some((w as u32 * 64 + bit) as u8);
                    }
                    Err(now) => cur = now,
                }
            }
        }
        self.refresh_any();
        None
    }

    /// Waits until a request, a kick or `stop`, at most `timeout`. The
    /// checks are made under the lock a kick takes, so a request or a stop
    /// set before its kick is never slept through.
    pub(crate) fn wait(&self, timeout: Duration, stop: Option<&AtomicBool>) {
        let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.any.load(Ordering::SeqCst) || stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return;
        }
        let _ = self.wake.wait_timeout(g, timeout);
    }
}

/// What raised an event being delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// A processor-detected exception.
    Exception,
    /// INT n, INT3, INTO: the gate's DPL is checked against CPL.
    Soft,
    /// An external interrupt or NMI: EXT is set in error codes.
    External,
}

pub(crate) fn gp(code: u16) -> Stop {
    Stop::Fault(Exception::with_code(Exception::GP, u32::from(code)))
}

pub(crate) fn exc(vector: u8, code: u16) -> Stop {
    Stop::Fault(Exception::with_code(vector, u32::from(code)))
}

fn is_code(d: &Segment) -> bool {
    d.s && d.type_ & 8 != 0
}

fn conforming(d: &Segment) -> bool {
    is_code(d) && d.type_ & 4 != 0
}

pub(crate) fn internal(what: &'static str) -> Stop {
    Stop::Exit(Exit::InternalError(what))
}

impl Core {
    pub(crate) fn protected(&self) -> bool {
        self.cpu.cr0 & bits::CR0_PE != 0 && self.cpu.rflags & VM == 0
    }

    pub(crate) fn long_mode(&self) -> bool {
        self.cpu.efer & bits::EFER_LMA != 0
    }

    /// Reads the 8-byte descriptor `sel` names in the GDT or LDT, as a
    /// supervisor access; #GP(sel) past the table limit (or `vec` given).
    pub(crate) fn descriptor(&mut self, sel: u16, vec: u8) -> Result<u64, Stop> {
        let (base, limit) = if sel & 4 != 0 {
            if self.cpu.ldt.unusable || self.cpu.ldt.selector & !3 == 0 {
                return Err(exc(vec, sel & 0xfffc));
            }
            (self.cpu.ldt.base, u64::from(self.cpu.ldt.limit))
        } else {
            (self.cpu.gdt.base, u64::from(self.cpu.gdt.limit))
        };
        let off = u64::from(sel & !7);
        if off + 7 > limit {
            return Err(exc(vec, sel & 0xfffc));
        }
        self.read_as(self.sys_addr(base.wrapping_add(off)), 8, false)
    }

    /// A system-table linear address: 32 bits outside long mode.
    pub(crate) fn sys_addr(&self, a: u64) -> u64 {
        if self.long_mode() {
            a
        } else {
            a & 0xffff_ffff
        }
    }

    /// Loads DS/ES/FS/GS/SS the way MOV, POP and LDS-type instructions
    /// do, with the protected-mode checks (#GP/#SS/#NP with the selector
    /// as error code).
    pub(crate) fn load_data_segment(&mut self, idx: usize, sel: u16) -> Result<(), Stop> {
        if !self.protected() {
            let s = &mut self.cpu.segs[idx];
            s.selector = sel;
            s.base = u64::from(sel) << 4;
            s.unusable = false;
            s.present = true;
            return Ok(());
        }
        let cpl = self.cpu.cpl();
        let rpl = (sel & 3) as u8;
        if sel & !3 == 0 {
            if idx == seg::SS && !(self.cpu.bitness() == 64 && cpl < 3 && rpl == cpl) {
                return Err(gp(0));
            }
            self.cpu.segs[idx] = Segment {
                selector: sel,
                unusable: true,
                dpl: rpl,
                ..Default::default()
            };
            return Ok(());
        }
        let raw = self.descriptor(sel, Exception::GP)?;
        let d = Segment::from_descriptor(sel, raw);
        let e = sel & 0xfffc;
        if idx == seg::SS {
            if rpl != cpl || d.dpl != cpl || !d.s || is_code(&d) || d.type_ & 2 == 0 {
                return Err(gp(e));
            }
            if !d.present {
                return Err(exc(Exception::SS, e));
            }
        } else {
            if !d.s || (is_code(&d) && d.type_ & 2 == 0) {
                return Err(gp(e));
            }
            if (!is_code(&d) || !conforming(&d)) && (rpl > d.dpl || cpl > d.dpl) {
                return Err(gp(e));
            }
            if !d.present {
                return Err(exc(Exception::NP, e));
            }
        }
        self.cpu.segs[idx] = d;
        Ok(())
    }

    /// The code-segment descriptor for a far JMP/CALL to `sel` at the
    /// current privilege (no call gates or task switches).
    fn far_target(&mut self, sel: u16) -> Result<Segment, Stop> {
        if sel & !3 == 0 {
            return Err(gp(0));
        }
        let raw = self.descriptor(sel, Exception::GP)?;
        let cpl = self.cpu.cpl();
        let e = sel & 0xfffc;
        let d = Segment::from_descriptor(e | u16::from(cpl), raw);
        if !is_code(&d) {
            // Call gates, TSS and task gates are not supported.
            return Err(gp(e));
        }
        if conforming(&d) {
            if d.dpl > cpl {
                return Err(gp(e));
            }
        } else if (sel & 3) as u8 > cpl || d.dpl != cpl {
            return Err(gp(e));
        }
        if !d.present {
            return Err(exc(Exception::NP, e));
        }
        if self.long_mode() && d.l && d.db {
            return Err(gp(e));
        }
        Ok(d)
    }

    /// Far JMP to `sel:offset`.
    pub(crate) fn far_jump(&mut self, sel: u16, offset: u64, osize: usize) -> Result<(), Stop> {
        if !self.protected() {
            self.real_cs(sel);
            self.cpu.rip = offset & super::mask(osize);
            return Ok(());
        }
        let d = self.far_target(sel)?;
        self.cpu.segs[seg::CS] = d;
        self.cpu.rip = offset & super::mask(if d.l && self.long_mode() { 8 } else { osize });
        Ok(())
    }

    /// Far CALL: pushes CS and the return address with `osize` bytes each.
    pub(crate) fn far_call(
        &mut self,
        sel: u16,
        offset: u64,
        osize: usize,
        ret: u64,
        sw: usize,
    ) -> Result<(), Stop> {
        let d = if self.protected() {
            Some(self.far_target(sel)?)
        } else {
            None
        };
        let cs = u64::from(self.cpu.segs[seg::CS].selector);
        let rsp = self.cpu.gpr[4];
        let a1 = rsp.wrapping_sub(osize as u64) & super::mask(sw);
        let a2 = a1.wrapping_sub(osize as u64) & super::mask(sw);
        let ss = self.stack_linear(a1, sw);
        self.write(ss, osize, cs)?;
        let ss = self.stack_linear(a2, sw);
        self.write(ss, osize, ret)?;
        self.set_gpr(4, sw, a2);
        match d {
            Some(d) => {
                self.cpu.segs[seg::CS] = d;
                self.cpu.rip =
                    offset & super::mask(if d.l && self.long_mode() { 8 } else { osize });
            }
            None => {
                self.real_cs(sel);
                self.cpu.rip = offset & super::mask(osize);
            }
        }
        Ok(())
    }

    fn real_cs(&mut self, sel: u16) {
        let cs = &mut self.cpu.segs[seg::CS];
        cs.selector = sel;
        cs.base = u64::from(sel) << 4;
    }

    /// Linear address of stack offset `off` (SS base unless 64-bit).
    pub(crate) fn stack_linear(&self, off: u64, sw: usize) -> u64 {
        if sw == 8 {
            off
        } else {
            self.cpu.segs[seg::SS].base.wrapping_add(off) & 0xffff_ffff
        }
    }

    /// The code segment a far RET/IRET returns to, checked against the
    /// return selector's RPL (the new CPL).
    fn return_target(&mut self, sel: u16) -> Result<Segment, Stop> {
        if sel & !3 == 0 {
            return Err(gp(0));
        }
        let raw = self.descriptor(sel, Exception::GP)?;
        let e = sel & 0xfffc;
        let rpl = (sel & 3) as u8;
        let d = Segment::from_descriptor(sel, raw);
        if !is_code(&d) || rpl < self.cpu.cpl() {
            return Err(gp(e));
        }
        if conforming(&d) {
            if d.dpl > rpl {
                return Err(gp(e));
            }
        } else if d.dpl != rpl {
            return Err(gp(e));
        }
        if !d.present {
            return Err(exc(Exception::NP, e));
        }
        if self.long_mode() && d.l && d.db {
            return Err(gp(e));
        }
        Ok(d)
    }

    /// The SS a return to an outer level loads (checked at the new CPL).
    fn return_stack(&mut self, sel: u16, new_cpl: u8, to64: bool) -> Result<Segment, Stop> {
        if sel & !3 == 0 {
            if to64 && new_cpl < 3 && (sel & 3) as u8 == new_cpl {
                return Ok(Segment {
                    selector: sel,
                    unusable: true,
                    dpl: new_cpl,
                    ..Default::default()
                });
            }
            return Err(gp(0));
        }
        let raw = self.descriptor(sel, Exception::GP)?;
        let d = Segment::from_descriptor(sel, raw);
        let e = sel & 0xfffc;
        if (sel & 3) as u8 != new_cpl || d.dpl != new_cpl || !d.s || is_code(&d) || d.type_ & 2 == 0
        {
            return Err(gp(e));
        }
        if !d.present {
            return Err(exc(Exception::SS, e));
        }
        Ok(d)
    }

    /// After a return to an outer level: data segments the new CPL may not
    /// use become null.
    fn null_inaccessible_segments(&mut self, cpl: u8) {
        for idx in [seg::ES, seg::DS, seg::FS, seg::GS] {
            let s = self.cpu.segs[idx];
            if !s.unusable && (!is_code(&s) || !conforming(&s)) && s.dpl < cpl {
                let base = s.base;
                self.cpu.segs[idx] = Segment {
                    unusable: true,
                    // FS/GS bases survive in 64-bit mode as on hardware.
                    base: if self.long_mode() { base } else { 0 },
                    ..Default::default()
                };
            }
        }
    }

    /// Far RET (`osize`-byte slots) releasing `extra` bytes of arguments.
    pub(crate) fn far_return(&mut self, osize: usize, extra: u64, sw: usize) -> Result<(), Stop> {
        let m = super::mask(sw);
        let rsp = self.cpu.gpr[4] & m;
        let a = self.stack_linear(rsp, sw);
        let rip = self.read(a, osize)?;
        let a = self.stack_linear(rsp.wrapping_add(osize as u64) & m, sw);
        let sel = self.read(a, osize)? as u16;
        let after = rsp.wrapping_add(2 * osize as u64).wrapping_add(extra) & m;
        if !self.protected() {
            self.real_cs(sel);
            self.cpu.rip = rip & super::mask(osize);
            self.set_gpr(4, sw, after);
            return Ok(());
        }
        let d = self.return_target(sel)?;
        let new_cpl = (sel & 3) as u8;
        let to64 = d.l && self.long_mode();
        if new_cpl == self.cpu.cpl() {
            self.cpu.segs[seg::CS] = d;
            self.cpu.rip = rip & super::mask(if to64 { 8 } else { osize });
            self.set_gpr(4, sw, after);
            return Ok(());
        }
        let a = self.stack_linear(after, sw);
        let new_rsp = self.read(a, osize)?;
        let a = self.stack_linear(after.wrapping_add(osize as u64) & m, sw);
        let ss_sel = self.read(a, osize)? as u16;
        let ss = self.return_stack(ss_sel, new_cpl, to64)?;
        self.cpu.segs[seg::CS] = d;
        self.cpu.segs[seg::SS] = ss;
        self.cpu.rip = rip & super::mask(if to64 { 8 } else { osize });
        let new_sw = if to64 {
            8
        } else if ss.db {
            4
        } else {
            2
        };
        self.set_gpr(4, new_sw, new_rsp.wrapping_add(extra));
        self.null_inaccessible_segments(new_cpl);
        Ok(())
    }

    /// IRET/IRETD/IRETQ with `osize`-byte slots.
    pub(crate) fn iret(&mut self, osize: usize, sw: usize) -> Result<(), Stop> {
        let m = super::mask(sw);
        let rsp = self.cpu.gpr[4] & m;
        let mut vals = [0u64; 5];
        let protected = self.protected();
        let n = if self.cpu.bitness() == 64 { 5 } else { 3 };
        for (k, v) in vals.iter_mut().enumerate().take(n) {
            let a = self.stack_linear(rsp.wrapping_add((k * osize) as u64) & m, sw);
            *v = self.read(a, osize)?;
        }
        let [rip, cs_sel, flags, _, _] = vals;
        let cs_sel = cs_sel as u16;
        let cpl = self.cpu.cpl();
        let iopl = ((self.cpu.rflags >> 12) & 3) as u8;
        self.nmi_blocked = false;
        if !protected {
            if self.cpu.rflags & VM != 0 {
                return Err(internal("IRET in virtual-8086 mode"));
            }
            self.real_cs(cs_sel);
            self.cpu.rip = rip & super::mask(osize);
            self.set_flags_from_iret(flags, osize, 0, 3);
            self.set_gpr(4, sw, rsp.wrapping_add(3 * osize as u64));
            return Ok(());
        }
        if self.cpu.rflags & NT != 0 {
            if self.long_mode() {
                return Err(gp(0));
            }
            return Err(internal("IRET to a nested task (task switches)"));
        }
        if osize == 4 && flags & VM != 0 && cpl == 0 && !self.long_mode() {
            return Err(internal("IRET to virtual-8086 mode"));
        }
        let d = self.return_target(cs_sel)?;
        let new_cpl = (cs_sel & 3) as u8;
        let to64 = d.l && self.long_mode();
        let rip_mask = super::mask(if to64 { 8 } else { osize });
        if self.cpu.bitness() != 64 && new_cpl == cpl {
            self.cpu.segs[seg::CS] = d;
            self.cpu.rip = rip & rip_mask;
            self.set_flags_from_iret(flags, osize, cpl, iopl);
            self.set_gpr(4, sw, rsp.wrapping_add(3 * osize as u64));
            return Ok(());
        }
        let (new_rsp, ss_sel) = if n == 5 {
            (vals[3], vals[4] as u16)
        } else {
            let a = self.stack_linear(rsp.wrapping_add(3 * osize as u64) & m, sw);
            let r = self.read(a, osize)?;
            let a = self.stack_linear(rsp.wrapping_add(4 * osize as u64) & m, sw);
            (r, self.read(a, osize)? as u16)
        };
        let ss = self.return_stack(ss_sel, new_cpl, to64)?;
        if to64 && ((rip as i64) << 16 >> 16) as u64 != rip {
            return Err(gp(0));
        }
        self.cpu.segs[seg::CS] = d;
        self.cpu.segs[seg::SS] = ss;
        self.cpu.rip = rip & rip_mask;
        self.set_flags_from_iret(flags, osize, cpl, iopl);
        let new_sw = if to64 {
            8
        } else if ss.db {
            4
        } else {
            2
        };
        self.set_gpr(4, new_sw, new_rsp);
        if new_cpl > cpl {
            self.null_inaccessible_segments(new_cpl);
        }
        Ok(())
    }

    /// RFLAGS from an IRET image, with the privilege rules for IF/IOPL.
    fn set_flags_from_iret(&mut self, v: u64, osize: usize, cpl: u8, iopl: u8) {
        use crate::state::rflags::{FIXED1, ID, IOPL, STATUS, VIF, VIP};
        let mut writable = STATUS | TF | IF | crate::state::rflags::DF | NT | IOPL | RF | AC | ID;
        if cpl == 0 {
            writable |= VIF | VIP;
        }
        if cpl > 0 {
            writable &= !IOPL;
        }
        if cpl > iopl {
            writable &= !IF;
        }
        writable &= super::mask(osize);
        self.cpu.rflags = (self.cpu.rflags & !writable) | (v & writable) | FIXED1;
    }

    /// Delivers `vector` through the IVT (real mode) or IDT. On success
    /// the handler's state is loaded; on a fault nothing has changed (the
    /// caller decides between the fault and #DF).
    pub(crate) fn deliver(
        &mut self,
        vector: u8,
        code: Option<u32>,
        kind: EventKind,
    ) -> Result<(), Stop> {
        let ext = u16::from(kind == EventKind::External);
        let idt_err = u16::from(vector) * 8 + 2 + ext;
        if !self.protected() {
            if self.cpu.rflags & VM != 0 {
                return Err(internal("interrupt in virtual-8086 mode"));
            }
            let off = u64::from(vector) * 4;
            if off + 3 > u64::from(self.cpu.idt.limit) {
                return Err(gp(idt_err));
            }
            let ent = self.read_as((self.cpu.idt.base + off) & 0xffff_ffff, 4, false)?;
            let sw = if self.cpu.segs[seg::SS].db { 4 } else { 2 };
            let m = super::mask(sw);
            let rsp = self.cpu.gpr[4];
            let items = [
                self.cpu.rflags & 0xffff,
                u64::from(self.cpu.segs[seg::CS].selector),
                self.cpu.rip & 0xffff,
            ];
            let mut sp = rsp;
            for v in items {
                sp = sp.wrapping_sub(2) & m;
                let a = self.stack_linear(sp, sw);
                self.write_as(a, 2, v, false)?;
            }
            self.set_gpr(4, sw, sp);
            self.real_cs((ent >> 16) as u16);
            self.cpu.rip = ent & 0xffff;
            self.cpu.rflags &= !(IF | TF | AC | RF);
            return Ok(());
        }

        let long = self.long_mode();
        let (gsz, lo, hi) = if long { (16u64, 0, 0) } else { (8u64, 0, 0) };
        let _ = (lo, hi);
        let off = u64::from(vector) * gsz;
        if off + gsz - 1 > u64::from(self.cpu.idt.limit) {
            return Err(gp(idt_err));
        }
        let base = self.sys_addr(self.cpu.idt.base.wrapping_add(off));
        let lo = self.read_as(base, 8, false)?;
        let hi = if long {
            self.read_as(base.wrapping_add(8), 8, false)?
        } else {
            0
        };
        let typ = ((lo >> 40) & 0x1f) as u8;
        let gdpl = ((lo >> 45) & 3) as u8;
        let present = lo & (1 << 47) != 0;
        let cpl = self.cpu.cpl();
        let valid = if long {
            matches!(typ, 0xe | 0xf)
        } else {
            matches!(typ, 0x5 | 0x6 | 0x7 | 0xe | 0xf)
        };
        if !valid {
            return Err(gp(idt_err));
        }
        if kind == EventKind::Soft && gdpl < cpl {
            return Err(gp(idt_err));
        }
        if !present {
            return Err(exc(Exception::NP, idt_err));
        }
        if typ == 0x5 {
            return Err(internal("task gate in the IDT (task switches)"));
        }
        let trap = typ & 1 != 0;
        let gate32 = typ & 8 != 0;
        let sel = (lo >> 16) as u16;
        let mut offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        if long {
            offset |= (hi & 0xffff_ffff) << 32;
        } else if !gate32 {
            offset &= 0xffff;
        }
        let ist = if long { (lo >> 32) & 7 } else { 0 };

        if sel & !3 == 0 {
            return Err(gp(ext));
        }
        let raw = self.descriptor(sel, Exception::GP)?;
        let e = (sel & 0xfffc) + ext;
        let mut d = Segment::from_descriptor(sel, raw);
        if !is_code(&d) || d.dpl > cpl || (long && (!d.l || d.db)) {
            return Err(gp(e));
        }
        if !d.present {
            return Err(exc(Exception::NP, e));
        }
        let new_cpl = if conforming(&d) { cpl } else { d.dpl };
        d.selector = (sel & 0xfffc) | u16::from(new_cpl);
        let old_ss = self.cpu.segs[seg::SS];
        let old_rsp = self.cpu.gpr[4];
        let flags = self.cpu.rflags;
        let old_cs = u64::from(self.cpu.segs[seg::CS].selector);
        let rip = self.cpu.rip;
        let user = new_cpl == 3;

        if long {
            let tr = self.cpu.tr;
            let tss_slot = if ist != 0 {
                Some(0x24 + 8 * (ist - 1))
            } else if new_cpl < cpl {
                Some(4 + 8 * u64::from(new_cpl))
            } else {
                None
            };
            let mut rsp = match tss_slot {
                Some(slot) => {
                    if slot + 7 > u64::from(tr.limit) || tr.unusable {
                        return Err(exc(Exception::TS, (tr.selector & 0xfffc) + ext));
                    }
                    self.read_as(tr.base.wrapping_add(slot), 8, false)?
                }
                None => old_rsp,
            };
            if ((rsp as i64) << 16 >> 16) as u64 != rsp {
                return Err(exc(Exception::SS, ext));
            }
            rsp &= !0xf;
            let mut frame = [0u64; 6];
            frame[0] = u64::from(old_ss.selector);
            frame[1] = old_rsp;
            frame[2] = flags;
            frame[3] = old_cs;
            frame[4] = rip;
            let mut n = 5;
            if let Some(c) = code {
                frame[5] = u64::from(c);
                n = 6;
            }
            for v in frame.iter().take(n) {
                rsp = rsp.wrapping_sub(8);
                self.write_as(rsp, 8, *v, user)?;
            }
            if new_cpl != cpl {
                self.cpu.segs[seg::SS] = Segment {
                    selector: u16::from(new_cpl),
                    unusable: true,
                    dpl: new_cpl,
                    ..Default::default()
                };
            }
            self.cpu.segs[seg::CS] = d;
            self.cpu.gpr[4] = rsp;
            self.cpu.rip = offset;
        } else {
            let w: usize = if gate32 { 4 } else { 2 };
            let (ss, sp, sw) = if new_cpl < cpl {
                // Inner stack from the 32-bit (or 16-bit) TSS.
                let tr = self.cpu.tr;
                let tss32 = tr.type_ & 8 != 0;
                let (sp_off, ss_off, spw) = if tss32 {
                    (4 + 8 * u64::from(new_cpl), 8 + 8 * u64::from(new_cpl), 4)
                } else {
                    (2 + 4 * u64::from(new_cpl), 4 + 4 * u64::from(new_cpl), 2)
                };
                if ss_off + 1 > u64::from(tr.limit) || tr.unusable {
                    return Err(exc(Exception::TS, (tr.selector & 0xfffc) + ext));
                }
                let b = tr.base;
                let sp = self.read_as(self.sys_addr(b.wrapping_add(sp_off)), spw, false)?;
                let ss_sel = self.read_as(self.sys_addr(b.wrapping_add(ss_off)), 2, false)? as u16;
                let ts = exc(Exception::TS, (ss_sel & 0xfffc) + ext);
                if ss_sel & !3 == 0 {
                    return Err(ts);
                }
                let raw = self.descriptor(ss_sel, Exception::TS)?;
                let ssd = Segment::from_descriptor(ss_sel, raw);
                if (ss_sel & 3) as u8 != new_cpl
                    || ssd.dpl != new_cpl
                    || !ssd.s
                    || is_code(&ssd)
                    || ssd.type_ & 2 == 0
                {
                    return Err(ts);
                }
                if !ssd.present {
                    return Err(exc(Exception::SS, (ss_sel & 0xfffc) + ext));
                }
                let sw = if ssd.db { 4 } else { 2 };
                (ssd, sp, sw)
            } else {
                let sw = if old_ss.db { 4 } else { 2 };
                (old_ss, old_rsp, sw)
            };
            let m = super::mask(sw);
            let mut frame = [0u64; 6];
            let mut n = 0;
            if new_cpl < cpl {
                frame[0] = u64::from(old_ss.selector);
                frame[1] = old_rsp;
                n = 2;
            }
            frame[n] = flags;
            frame[n + 1] = old_cs;
            frame[n + 2] = rip;
            n += 3;
            if let Some(c) = code {
                frame[n] = u64::from(c);
                n += 1;
            }
            let mut sp = sp;
            for v in frame.iter().take(n) {
                sp = sp.wrapping_sub(w as u64) & m;
                let a = ss.base.wrapping_add(sp) & 0xffff_ffff;
                self.write_as(a, w, *v & super::mask(w), user)?;
            }
            self.cpu.segs[seg::SS] = ss;
            self.cpu.segs[seg::CS] = d;
            self.set_gpr(4, sw, sp);
            self.cpu.rip = offset;
        }
        self.cpu.rflags &= !(TF | NT | RF | VM);
        if !trap {
            self.cpu.rflags &= !IF;
        }
        Ok(())
    }
}
