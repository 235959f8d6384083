//! README.md against the commands themselves: every `vessel` and
//! `vessel-runc` command line the README shows names subcommands, flags and
//! values that the command's `--help` lists, and every subcommand and flag
//! that `--help` lists is shown in the README. Files, build profiles and
//! environment variables the README names exist. So the README cannot
//! promise what the CLI does not do, nor leave out what it does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn readme() -> String {
    std::fs::read_to_string(workspace().join("README.md")).expect("reading README.md")
}

fn binary(name: &str) -> &'static str {
    match name {
        "vessel" => env!("CARGO_BIN_EXE_vessel"),
        "vessel-runc" => env!("CARGO_BIN_EXE_vessel-runc"),
        other => panic!("no binary {other}"),
    }
}

/// `BIN PATH... --help`, which must succeed.
fn help(bin: &str, path: &[String]) -> String {
    let out = Command::new(binary(bin))
        .args(path)
        .arg("--help")
        .output()
        .expect("running --help");
    assert!(
        out.status.success(),
        "`{bin} {} --help` failed: {}",
        path.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines of a `--help` section (`Commands:`, `Options:`) up to the
/// next blank-line-separated heading.
fn section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = help.lines().skip_while(|l| *l != heading);
    if lines.next().is_none() {
        return Vec::new();
    }
    lines
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .collect()
}

/// The subcommands a `--help` lists (without clap's `help`).
fn subcommands(help: &str) -> Vec<String> {
    section(help, "Commands:")
        .iter()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// The flags a `--help` lists (`-e`, `--env`, ...), without help and version.
fn options(help: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for line in section(help, "Options:") {
        let trimmed = line.trim_start();
        if !trimmed.starts_with('-') {
            continue;
        }
        for word in trimmed.split([' ', ',']).take_while(|w| !w.is_empty()) {
            let flag: String = word
                .chars()
                .take_while(|c| *c == '-' || c.is_ascii_alphanumeric())
                .collect();
            if flag.starts_with('-') && flag.len() > 1 {
                flags.insert(flag);
            }
        }
    }
    for builtin in ["-h", "--help", "-V", "--version"] {
        flags.remove(builtin);
    }
    flags
}

/// The values a `--help` lists for `flag` ("Possible values:" or `[possible values: ...]`).
fn possible_values(help: &str, flag: &str) -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    let mut lines = help.lines().skip_while(|l| {
        !l.trim_start()
            .split([' ', ','])
            .any(|w| w == flag || w.starts_with(&format!("{flag}=")))
    });
    let Some(first) = lines.next() else {
        return values;
    };
    if let Some((_, list)) = first.split_once("[possible values: ") {
        for v in list.trim_end_matches(']').split(", ") {
            values.insert(v.to_owned());
        }
        return values;
    }
    for line in lines {
        let t = line.trim_start();
        if t.starts_with('-') && !t.starts_with("- ") {
            break; // the next option
        }
        if let Some(item) = t.strip_prefix("- ") {
            if let Some(v) = item.split(':').next() {
                values.insert(v.trim().to_owned());
            }
        }
    }
    values
}

/// The command lines of the README's ``` blocks: continuation lines joined,
/// comments dropped.
fn code_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let code = match line.find(" #") {
            Some(i) => &line[..i],
            None => line,
        };
        let code = code.trim();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(code);
        if !pending.trim().is_empty() {
            lines.push(pending.trim().to_owned());
        }
        pending.clear();
    }
    lines
}

/// One command line the README shows for BIN: the subcommand path, and
/// each flag with the `a|b|c` values shown right after it (if any).
#[derive(Debug)]
struct Shown {
    bin: String,
    path: Vec<String>,
    flags: Vec<(String, Vec<String>)>,
    /// A trailing `a|b|c` of subcommands (vessel-runc's line).
    subcommand_choice: Vec<String>,
    line: String,
}

fn parse_shown(line: &str) -> Option<Shown> {
    let mut words = line.split_whitespace().peekable();
    let bin = match *words.peek()? {
        "vessel" | "vessel-runc" => words.next()?.to_owned(),
        "cargo" => {
            // `cargo run ... -p vessel -- ARGS`: ARGS are vessel's.
            let (cargo_args, rest) = line.split_once(" -- ")?;
            if !cargo_args.starts_with("cargo run ") || !cargo_args.contains("-p vessel") {
                return None;
            }
            return parse_shown(&format!("vessel {rest}"));
        }
        _ => return None,
    };
    let bare = |w: &str| {
        w.trim_matches(|c| c == '[' || c == ']' || c == '.')
            .to_owned()
    };
    let mut shown = Shown {
        bin,
        path: Vec::new(),
        flags: Vec::new(),
        subcommand_choice: Vec::new(),
        line: line.to_owned(),
    };
    // Leading plain words are the subcommand path.
    while let Some(w) = words.peek() {
        if w.starts_with('-') || w.starts_with('[') || w.contains('|') || w.contains('=') {
            break;
        }
        if w.chars().all(|c| c.is_ascii_lowercase()) {
            shown.path.push(words.next()?.to_owned());
        } else {
            break;
        }
    }
    let words: Vec<String> = words.map(|w| w.to_owned()).collect();
    let mut i = 0;
    while i < words.len() {
        let w = bare(&words[i]);
        if w == "--" {
            break; // the command for the guest or container follows
        }
        if w.starts_with('-') && w.len() > 1 {
            let flag = w.split('=').next().unwrap_or(&w).to_owned();
            let values: Vec<String> = words
                .get(i + 1)
                .map(|v| bare(v))
                // `a|b|c` alone: a choice of values (not a `PATH[,x|y]` synopsis).
                .filter(|v| {
                    v.contains('|')
                        && v.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '|' || c == '-')
                })
                .map(|v| v.split('|').map(str::to_owned).collect())
                .unwrap_or_default();
            if !values.is_empty() {
                i += 1; // the values are the flag's, not a choice of subcommands
            }
            shown.flags.push((flag, values));
        } else if w.contains('|') && w.chars().all(|c| c.is_ascii_lowercase() || c == '|') {
            shown.subcommand_choice = w.split('|').map(str::to_owned).collect();
        }
        i += 1;
    }
    Some(shown)
}

fn shown_lines() -> Vec<Shown> {
    code_lines(&readme())
        .iter()
        .filter_map(|l| parse_shown(l))
        .collect()
}

#[test]
fn every_command_line_in_the_readme_is_one_the_cli_takes() {
    let shown = shown_lines();
    assert!(
        shown.len() >= 6,
        "found only {} command lines: {shown:#?}",
        shown.len()
    );
    for s in &shown {
        let help = help(&s.bin, &s.path);
        let flags = options(&help);
        for (flag, values) in &s.flags {
            assert!(
                flags.contains(flag),
                "README shows `{}`, but `{} {} --help` has no {flag}:\n{help}",
                s.line,
                s.bin,
                s.path.join(" ")
            );
            if !values.is_empty() {
                let offered = possible_values(&help, flag);
                let shown: BTreeSet<String> = values.iter().cloned().collect();
                if offered.is_empty() {
                    // A free-form value: its help must name each value shown.
                    for v in &shown {
                        assert!(
                            help.contains(v.as_str()),
                            "README shows `{}`: --help never mentions {flag} {v}",
                            s.line
                        );
                    }
                } else {
                    assert_eq!(
                        shown, offered,
                        "README shows `{}`: the values of {flag} differ from --help",
                        s.line
                    );
                }
            }
        }
        if !s.subcommand_choice.is_empty() {
            let offered: BTreeSet<String> = subcommands(&help).into_iter().collect();
            let shown: BTreeSet<String> = s.subcommand_choice.iter().cloned().collect();
            assert_eq!(shown, offered, "README shows `{}`", s.line);
        }
    }
}

#[test]
fn every_subcommand_and_flag_is_in_the_readme() {
    let shown = shown_lines();
    // Walk vessel's subcommands; each leaf must be shown, with all its flags.
    let mut missing = Vec::new();
    let mut stack: Vec<(String, Vec<String>)> = vec![("vessel".into(), vec![])];
    while let Some((bin, path)) = stack.pop() {
        let help = help(&bin, &path);
        let subs = subcommands(&help);
        let lines: Vec<&Shown> = shown
            .iter()
            .filter(|s| s.bin == bin && s.path == path)
            .collect();
        if subs.is_empty() && lines.is_empty() {
            missing.push(format!("no line shows `{bin} {}`", path.join(" ")));
        }
        for flag in options(&help) {
            if !lines
                .iter()
                .any(|s| s.flags.iter().any(|(f, _)| *f == flag))
            {
                missing.push(format!("`{bin} {}` {flag}", path.join(" ")));
            }
        }
        for sub in subs {
            let mut p = path.clone();
            p.push(sub);
            stack.push((bin.clone(), p));
        }
    }
    // vessel-runc: its global flags, and every subcommand in the line's choice.
    let help = help("vessel-runc", &[]);
    let runc: Vec<&Shown> = shown.iter().filter(|s| s.bin == "vessel-runc").collect();
    for flag in options(&help) {
        if !runc.iter().any(|s| s.flags.iter().any(|(f, _)| *f == flag)) {
            missing.push(format!("`vessel-runc` {flag}"));
        }
    }
    for sub in subcommands(&help) {
        if !runc.iter().any(|s| s.subcommand_choice.contains(&sub)) {
            missing.push(format!("`vessel-runc {sub}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "the CLI has these, the README does not show them: {missing:#?}"
    );
}

/// Inline code in the README's prose: `vessel ...` commands, `--flags`,
/// `bench/` scripts, cargo profiles and `VESSEL_*` variables must exist.
#[test]
fn what_the_readme_names_in_its_prose_exists() {
    let text = readme();
    let spans: Vec<&str> = text
        .split("```")
        .step_by(2)
        .flat_map(|prose| prose.split('`').skip(1).step_by(2))
        .collect();
    assert!(spans.len() > 20, "{spans:?}");
    let mut all_flags: BTreeSet<String> = ["--help", "--version"].map(String::from).into();
    let mut stack: Vec<(&str, Vec<String>)> = vec![("vessel", vec![]), ("vessel-runc", vec![])];
    while let Some((bin, path)) = stack.pop() {
        let help = help(bin, &path);
        all_flags.extend(options(&help));
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            stack.push((bin, p));
        }
    }
    let sources = source_text();
    let cargo_toml = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    for span in spans {
        if let Some(s) = parse_shown(span) {
            let help = help(&s.bin, &s.path);
            for (flag, _) in &s.flags {
                assert!(
                    options(&help).contains(flag),
                    "README's `{span}`: no {flag} in --help"
                );
            }
        }
        let first = span.split_whitespace().next().unwrap_or("");
        if first.starts_with("--") {
            let flag = first.split('=').next().unwrap_or(first);
            assert!(
                all_flags.contains(flag),
                "README's `{span}`: no command takes {flag}"
            );
        }
        if first.starts_with("bench/") {
            let script = workspace().join(first);
            let mode = std::fs::metadata(&script)
                .unwrap_or_else(|_| panic!("README's `{span}`: no {first}"))
                .permissions();
            // Scripts run; their sources (bench/tools/*.rs) only exist.
            assert!(
                !first.ends_with(".sh")
                    || std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
                "{first} is not executable"
            );
        }
        if let Some(profile) = span.strip_prefix("cargo build --profile ") {
            assert!(
                cargo_toml.contains(&format!("[profile.{}]", profile.trim())),
                "README's `{span}`: no such profile"
            );
        }
        for word in span.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("VESSEL_") {
                assert!(
                    sources.contains(word),
                    "README's `{span}`: nothing reads {word}"
                );
            }
        }
    }
}

/// The workspace's Rust sources and bench scripts, concatenated.
fn source_text() -> String {
    fn walk(dir: &Path, out: &mut String) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("tests") && !path.ends_with("target") {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "rs" || e == "sh") {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let mut out = String::new();
    walk(&workspace().join("crates"), &mut out);
    walk(&workspace().join("bench"), &mut out);
    out
}

#[test]
fn the_parser_reads_synopses() {
    let s =
        parse_shown("vessel run [--accel auto|kvm|emu] [--cpus N] [-e KEY=VALUE]... -- CMD --x")
            .unwrap();
    assert_eq!(s.path, ["run"]);
    let flags: Vec<&str> = s.flags.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(flags, ["--accel", "--cpus", "-e"]);
    assert_eq!(s.flags[0].1, ["auto", "kvm", "emu"]);
    let s = parse_shown("cargo run --release -p vessel -- run -- uname -r").unwrap();
    assert_eq!(
        (s.bin.as_str(), s.path.as_slice()),
        ("vessel", &["run".to_owned()][..])
    );
    let s = parse_shown("vessel-runc [--root DIR] create|start|state").unwrap();
    assert_eq!(s.subcommand_choice, ["create", "start", "state"]);
    assert!(parse_shown("cargo test --workspace").is_none());
    assert!(parse_shown("cargo test --workspace -- --ignored").is_none());
}
