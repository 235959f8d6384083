//! Encoding the guest command for the kernel command line.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::error::{Error, Result};

/// Longest kernel command line an x86-64 kernel accepts, in bytes (COMMAND_LINE_SIZE is
/// 2048 including the terminating NUL). The host must keep the *whole* line, this
/// fragment plus its own parameters, within it.
pub const KERNEL_COMMAND_LINE_MAX: usize = 2047;

/// The kernel parameter that carries the command, without the `=`.
pub const CMD_PARAM: &str = "vessel.cmd";

/// The kernel command-line fragment `vessel.cmd=B64,B64,...` that makes the guest's init
/// run `argv` (one standard, padded base64 element per argument).
///
/// Base64 keeps every argument a single kernel parameter word whatever it contains;
/// `vessel.` has a dot so the kernel treats it as a module parameter and does not hand it
/// to init as an environment variable or argument.
///
/// Errors: empty `argv` or empty `argv[0]` (nothing to run), an argument containing NUL
/// (a program cannot receive it), or a fragment that alone exceeds
/// [`KERNEL_COMMAND_LINE_MAX`].
pub fn command_line_for(argv: &[String]) -> Result<String> {
    // argv[0] empty would encode to `vessel.cmd=`, which init reads as "no command".
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(Error::EmptyCommand);
    }
    if let Some(index) = argv.iter().position(|a| a.contains('\0')) {
        return Err(Error::NulInArgument { index });
    }
    let encoded: Vec<String> = argv.iter().map(|a| STANDARD.encode(a)).collect();
    let fragment = format!("{CMD_PARAM}={}", encoded.join(","));
    if fragment.len() > KERNEL_COMMAND_LINE_MAX {
        return Err(Error::CommandTooLong {
            len: fragment.len(),
            max: KERNEL_COMMAND_LINE_MAX,
        });
    }
    Ok(fragment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(fragment: &str) -> Vec<String> {
        let list = fragment.strip_prefix("vessel.cmd=").expect("prefix");
        list.split(',')
            .map(|e| String::from_utf8(STANDARD.decode(e).expect("base64")).expect("utf-8"))
            .collect()
    }

    #[test]
    fn round_trip() {
        let argv: Vec<String> = [
            "sh",
            "-c",
            "echo \"hi there\"; exit 3",
            "",
            "a,b=c",
            "ü ✓\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let fragment = command_line_for(&argv).unwrap();
        assert!(!fragment.contains(char::is_whitespace), "{fragment}");
        assert!(!fragment.contains('"'), "{fragment}");
        assert_eq!(decode(&fragment), argv);
        assert_eq!(
            command_line_for(&["ls".to_string()]).unwrap(),
            "vessel.cmd=bHM="
        );
    }

    #[test]
    fn rejects_bad_argv() {
        assert!(matches!(command_line_for(&[]), Err(Error::EmptyCommand)));
        assert!(matches!(
            command_line_for(&[String::new()]),
            Err(Error::EmptyCommand)
        ));
        let nul = vec!["echo".to_string(), "a\0b".to_string()];
        assert!(matches!(
            command_line_for(&nul),
            Err(Error::NulInArgument { index: 1 })
        ));
        let long = vec!["x".repeat(2000)];
        let err = command_line_for(&long).unwrap_err();
        assert!(matches!(err, Error::CommandTooLong { .. }), "{err}");
        assert!(!command_line_for(&[]).unwrap_err().to_string().is_empty());
    }
}
