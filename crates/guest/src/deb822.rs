//! A small streaming reader for deb822 control data (Release, Packages, `.sources`).
//!
//! Packages for bookworm/main is ~45 MB once decompressed, so paragraphs are produced one
//! at a time from a `BufRead` instead of loading and splitting the whole text.

use std::io::{self, BufRead};

/// One paragraph: fields in file order, continuation lines joined with `\n`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Paragraph {
    fields: Vec<(String, String)>,
}

impl Paragraph {
    /// Field value by name; deb822 field names are case-insensitive.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Iterator over the paragraphs of a deb822 stream.
pub(crate) struct Paragraphs<R> {
    reader: R,
    line: Vec<u8>,
    done: bool,
}

impl<R: BufRead> Paragraphs<R> {
    pub(crate) fn new(reader: R) -> Self {
        Paragraphs {
            reader,
            line: Vec::new(),
            done: false,
        }
    }

    fn next_paragraph(&mut self) -> io::Result<Option<Paragraph>> {
        let mut para = Paragraph::default();
        loop {
            self.line.clear();
            if self.reader.read_until(b'\n', &mut self.line)? == 0 {
                self.done = true;
                return Ok((!para.is_empty()).then_some(para));
            }
            // Lossy: a stray non-UTF-8 byte in some unrelated package's description must
            // not make the whole index unreadable.
            let text = String::from_utf8_lossy(&self.line);
            let line = text.trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() {
                if para.is_empty() {
                    continue; // several blank lines between paragraphs
                }
                return Ok(Some(para));
            }
            if line.starts_with('#') {
                continue; // comments are allowed in .sources files
            }
            if line.starts_with([' ', '\t']) {
                // Continuation of the previous field (e.g. the SHA256 list in Release).
                if let Some((_, value)) = para.fields.last_mut() {
                    value.push('\n');
                    value.push_str(line.trim());
                }
                continue;
            }
            match line.split_once(':') {
                Some((name, value)) => para
                    .fields
                    .push((name.trim().to_owned(), value.trim().to_owned())),
                // Not a field line; ignore it rather than reject the whole file.
                None => continue,
            }
        }
    }
}

impl<R: BufRead> Iterator for Paragraphs<R> {
    type Item = io::Result<Paragraph>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.next_paragraph().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_and_continuations() {
        let text =
            "\n\nPackage: a\nDescription: short\n long line\n .\n\n\n# c\npackage: b\nsize:  12 \n";
        let paras: Vec<Paragraph> = Paragraphs::new(text.as_bytes())
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(paras.len(), 2);
        assert_eq!(paras[0].get("package"), Some("a"));
        assert_eq!(paras[0].get("Description"), Some("short\nlong line\n."));
        assert_eq!(paras[1].get("Package"), Some("b"));
        assert_eq!(paras[1].get("Size"), Some("12"));
        assert_eq!(paras[1].get("Missing"), None);
    }
}
