//! Seccomp filters: vessel's default one and OCI `linux.seccomp` profiles, compiled to
//! classic BPF by `seccompiler` in the parent. The child only installs the finished
//! programs (see [`crate::child`]), right before exec.
//!
//! A profile may need several programs: seccompiler gives each program one action on a
//! match, so every distinct action gets its own program, and the kernel applies the
//! most restrictive result of all of them (KILL over TRAP over ERRNO over ALLOW).

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::error::{Error, Result};
use crate::syscalls_x86_64::SYSCALLS;

/// Compiled BPF programs, installed in order.
pub type Programs = Vec<Vec<libc::sock_filter>>;

/// System calls a container never needs and that reach past it: kernel modules and
/// kexec, mounting and namespaces (after set-up), swap, reboot, the clock, BPF and perf,
/// the kernel keyring, handle-based opens that escape bind mounts, userfaultfd, process
/// accounting, quotas, raw I/O ports and obsolete calls. The spirit of Docker's default
/// profile, as a deny list: they fail with EPERM.
pub const DEFAULT_DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "_sysctl",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
];

/// The number of a system call on x86-64, if this table knows it.
pub fn syscall_number(name: &str) -> Option<i64> {
    SYSCALLS.iter().find(|(n, _)| *n == name).map(|&(_, nr)| nr)
}

fn seccomp_error(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("seccomp: {e}"))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<Vec<libc::sock_filter>> {
    let filter =
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(seccomp_error)?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(seccomp_error)?;
    Ok(program
        .into_iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect())
}

/// vessel's default filter: [`DEFAULT_DENIED`] fail with EPERM, `clone` with
/// CLONE_NEWUSER too (the one namespace an unprivileged process could still create), and
/// `clone3` with ENOSYS, whose flags live in memory a filter cannot read: C libraries
/// then fall back to `clone`. `None` off x86-64, where there is no table yet.
pub fn default_filter() -> Result<Option<Programs>> {
    if !cfg!(target_arch = "x86_64") {
        return Ok(None);
    }
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DEFAULT_DENIED
        .iter()
        .filter_map(|name| syscall_number(name))
        .map(|nr| (nr, Vec::new()))
        .collect();
    let newuser = libc::CLONE_NEWUSER as u64;
    denied.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(newuser),
            newuser,
        )
        .map_err(seccomp_error)?])
        .map_err(seccomp_error)?],
    );
    let eperm = compile(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )?;
    let clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    Ok(Some(vec![eperm, clone3]))
}

/// An action of an OCI profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Log,
    Errno(u32),
    Trap,
    KillThread,
    KillProcess,
}

impl Action {
    fn to_seccompiler(self) -> SeccompAction {
        match self {
            Action::Allow => SeccompAction::Allow,
            Action::Log => SeccompAction::Log,
            Action::Errno(e) => SeccompAction::Errno(e),
            Action::Trap => SeccompAction::Trap,
            Action::KillThread => SeccompAction::KillThread,
            Action::KillProcess => SeccompAction::KillProcess,
        }
    }
}

/// One comparison of a system call argument (OCI `args`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgCmp {
    pub index: u8,
    pub op: ArgOp,
    pub value: u64,
}

/// OCI's SCMP_CMP_* operators; `MaskedEq(mask)` compares `arg & mask` with the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgOp {
    Ne,
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
    MaskedEq(u64),
}

/// One OCI syscall rule: these names get `action` when all `args` hold.
#[derive(Debug, Clone)]
pub struct SyscallRule {
    pub names: Vec<String>,
    pub action: Action,
    pub args: Vec<ArgCmp>,
}

/// An OCI profile reduced to what vessel supports.
#[derive(Debug, Clone)]
pub struct Profile {
    pub default_action: Action,
    pub syscalls: Vec<SyscallRule>,
}

fn rule_of(args: &[ArgCmp]) -> Result<Option<SeccompRule>> {
    if args.is_empty() {
        return Ok(None);
    }
    let conditions = args
        .iter()
        .map(|a| {
            let op = match a.op {
                ArgOp::Ne => SeccompCmpOp::Ne,
                ArgOp::Lt => SeccompCmpOp::Lt,
                ArgOp::Le => SeccompCmpOp::Le,
                ArgOp::Eq => SeccompCmpOp::Eq,
                ArgOp::Ge => SeccompCmpOp::Ge,
                ArgOp::Gt => SeccompCmpOp::Gt,
                ArgOp::MaskedEq(m) => SeccompCmpOp::MaskedEq(m),
            };
            SeccompCondition::new(a.index, SeccompCmpArgLen::Qword, op, a.value)
                .map_err(seccomp_error)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(SeccompRule::new(conditions).map_err(seccomp_error)?))
}

/// Adds `nr` with an optional condition to a rule map: no condition matches always, and
/// then wins over conditional rules of the same call.
fn add_rule(map: &mut BTreeMap<i64, Vec<SeccompRule>>, nr: i64, rule: Option<SeccompRule>) {
    match (map.get_mut(&nr), rule) {
        (Some(rules), _) if rules.is_empty() => {}
        (Some(rules), Some(rule)) => rules.push(rule),
        (Some(rules), None) => rules.clear(),
        (None, Some(rule)) => {
            map.insert(nr, vec![rule]);
        }
        (None, None) => {
            map.insert(nr, Vec::new());
        }
    }
}

/// Compiles an OCI profile. Names this table does not know are skipped (as libseccomp
/// skips calls the architecture lacks).
pub fn compile_profile(profile: &Profile) -> Result<Programs> {
    let mut listed: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut by_action: BTreeMap<Action, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for rule in &profile.syscalls {
        for name in &rule.names {
            let Some(nr) = syscall_number(name) else {
                tracing::debug!("seccomp: skipping unknown system call {name}");
                continue;
            };
            add_rule(&mut listed, nr, rule_of(&rule.args)?);
            if rule.action != Action::Allow {
                add_rule(
                    by_action.entry(rule.action).or_default(),
                    nr,
                    rule_of(&rule.args)?,
                );
            }
        }
    }
    let mut programs = Vec::new();
    // Calls no rule matches get the default action; matched ones pass this program and
    // meet their own action in the next ones.
    if profile.default_action != Action::Allow {
        programs.push(compile(
            listed,
            profile.default_action.to_seccompiler(),
            SeccompAction::Allow,
        )?);
    }
    for (action, rules) in by_action {
        if !rules.is_empty() {
            programs.push(compile(
                rules,
                SeccompAction::Allow,
                action.to_seccompiler(),
            )?);
        }
    }
    Ok(programs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_default() {
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("mount"), Some(libc::SYS_mount));
        assert_eq!(syscall_number("no_such_call"), None);
        for name in DEFAULT_DENIED {
            assert!(syscall_number(name).is_some(), "{name}");
        }
        let programs = default_filter().unwrap().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }

    #[test]
    fn profile_programs() {
        let profile = Profile {
            default_action: Action::Errno(1),
            syscalls: vec![
                SyscallRule {
                    names: vec!["read".into(), "write".into(), "bogus".into()],
                    action: Action::Allow,
                    args: vec![],
                },
                SyscallRule {
                    names: vec!["personality".into()],
                    action: Action::Allow,
                    args: vec![ArgCmp {
                        index: 0,
                        op: ArgOp::Eq,
                        value: 0,
                    }],
                },
                SyscallRule {
                    names: vec!["mount".into()],
                    action: Action::KillProcess,
                    args: vec![],
                },
            ],
        };
        assert_eq!(compile_profile(&profile).unwrap().len(), 2);
        let allow_all = Profile {
            default_action: Action::Allow,
            syscalls: vec![],
        };
        assert!(compile_profile(&allow_all).unwrap().is_empty());
    }
}
