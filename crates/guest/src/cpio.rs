//! A writer for the cpio "newc" format, the one the Linux kernel unpacks as initramfs.
//!
//! Layout per entry: a 110-byte ASCII header (`070701` + 13 eight-digit hex fields), the
//! NUL-terminated name padded to a multiple of 4 bytes (counting from the header start),
//! then the data padded likewise. The archive ends with an entry named `TRAILER!!!`.
//! Every entry gets mtime 0, uid/gid 0 and a fresh inode number counted from 1, so equal
//! input yields equal bytes.

use std::io::{self, Write};

pub(crate) const MAGIC: &[u8; 6] = b"070701";
pub(crate) const TRAILER: &str = "TRAILER!!!";

pub(crate) const S_IFDIR: u32 = 0o040000;
pub(crate) const S_IFREG: u32 = 0o100000;
pub(crate) const S_IFLNK: u32 = 0o120000;
pub(crate) const S_IFCHR: u32 = 0o020000;

pub(crate) struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        CpioWriter {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// A directory; its parents must have been written before.
    pub(crate) fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub(crate) fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and hands back the underlying writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 0, 1, (0, 0), 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        // The kernel takes names relative to the root; a leading slash would be kept verbatim.
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') || name == TRAILER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is too large for cpio newc (4 GiB)"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, ino, mode, nlink, rdev, size)?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        size: u32,
    ) -> io::Result<()> {
        let namesize = name.len() + 1; // including the NUL
        let namesize = u32::try_from(namesize)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry name too long"))?;
        // newc field order. uid, gid and mtime are always 0 for reproducible output;
        // devmajor/devminor (the file system the file came from) mean nothing here.
        let (uid, gid, mtime, devmajor, devminor, check) = (0, 0, 0, 0, 0, 0);
        let fields: [u32; 13] = [
            ino, mode, uid, gid, nlink, mtime, size, devmajor, devminor, rdev.0, rdev.1, namesize,
            check,
        ];
        let mut header = Vec::with_capacity(110);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.write(&header)?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..pad])
    }
}

/// Test-side reader: parses a newc archive back into entries, checking the framing.
#[cfg(test)]
pub(crate) mod read {
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Entry {
        pub name: String,
        pub ino: u32,
        pub mode: u32,
        pub nlink: u32,
        pub mtime: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    /// All entries up to and including the trailer; panics on malformed input (tests only).
    pub(crate) fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut out = Vec::new();
        loop {
            let start = total - bytes.len();
            assert_eq!(start % 4, 0, "entry not 4-aligned");
            assert_eq!(&bytes[..6], super::MAGIC, "bad magic at {start}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[6 + i * 8..6 + (i + 1) * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (ino, mode, nlink, mtime, size, rdev, namesize) = (
                field(0),
                field(1),
                field(4),
                field(5),
                field(6),
                (field(9), field(10)),
                field(11),
            );
            let namesize = namesize as usize;
            let name_end = 110 + namesize;
            assert_eq!(bytes[name_end - 1], 0, "name not NUL-terminated");
            let name = std::str::from_utf8(&bytes[110..name_end - 1])
                .unwrap()
                .to_owned();
            let data_start = (start + name_end).next_multiple_of(4) - start;
            let data_end = data_start + size as usize;
            let data = bytes[data_start..data_end].to_vec();
            let next = (start + data_end).next_multiple_of(4) - start;
            assert!(
                bytes[data_end..next.min(bytes.len())]
                    .iter()
                    .all(|b| *b == 0),
                "padding not zero"
            );
            bytes = &bytes[next.min(bytes.len())..];
            let is_trailer = name == super::TRAILER;
            out.push(Entry {
                name,
                ino,
                mode,
                nlink,
                mtime,
                rdev,
                data,
            });
            if is_trailer {
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::read::parse;
    use super::*;

    #[test]
    fn writes_parseable_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.file("abc", 0o644, b"abc").unwrap();
        w.symlink("etc-mtab", "/proc/mounts").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);

        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "empty",
                "abc",
                "etc-mtab",
                "TRAILER!!!"
            ]
        );
        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[1].mode, S_IFCHR | 0o600);
        assert_eq!(entries[1].rdev, (5, 1));
        assert_eq!(entries[2].mode, S_IFREG | 0o755);
        assert_eq!(entries[2].data, b"#!/bin/sh\n");
        assert_eq!(entries[4].data, b"abc");
        assert_eq!(entries[5].mode, S_IFLNK | 0o777);
        assert_eq!(entries[5].data, b"/proc/mounts");
        assert!(entries.iter().all(|e| e.mtime == 0));
        let inos: Vec<u32> = entries[..6].iter().map(|e| e.ino).collect();
        assert_eq!(inos, [1, 2, 3, 4, 5, 6]);
        assert_eq!(entries[6].ino, 0);

        // The very first header, byte for byte.
        let first = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(
            first,
            "070701\
             00000001000041ed000000000000000000000002000000000000000000000000\
             00000000000000000000000000000004\
             00000000"
        );
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
        assert!(w.file("TRAILER!!!", 0o644, b"").is_err());
    }
}
