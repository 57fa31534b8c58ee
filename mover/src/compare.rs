//! Comparing two trees entry by entry: how the demo and the end-to-end tests check a target
//! against its source.
//!
//! Both trees are listed with [`scan`], so symlinks are compared as links (their targets are
//! never followed) and sockets, FIFOs and devices are ignored on both sides, as a transfer
//! leaves them out. Ownership and atime are not compared (the manifest does not carry them).

use std::collections::HashMap;
use std::fmt::Display;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use mover_protocol::manifest::{Entry, EntryKind};

use crate::scan::{scan, source_path, ScanError};

/// Lists every difference between the trees `a` and `b`, one human-readable line each, in
/// `a`'s order and then the entries only `b` has. Empty means identical: same entries, kinds,
/// file contents (blake3), sizes, permission bits, mtimes (to the nanosecond) and symlink
/// targets, the roots' own mode and mtime included.
pub fn compare_trees(a: &Path, b: &Path) -> Result<Vec<String>, io::Error> {
    let ma = scan(a)
        .map_err(into_io)?
        .manifest
        .to_vec()
        .map_err(io::Error::other)?;
    let mb = scan(b)
        .map_err(into_io)?
        .manifest
        .to_vec()
        .map_err(io::Error::other)?;
    let (an, bn) = (a.display(), b.display());
    let by_path: HashMap<&[u8], &Entry> = mb.iter().map(|e| (&e.path[..], e)).collect();

    let mut diffs = Vec::new();
    for ea in &ma {
        let name = show(&ea.path);
        let Some(eb) = by_path.get(&ea.path[..]) else {
            diffs.push(format!("{name}: missing from {bn}"));
            continue;
        };
        let mut differ = |what: &str, x: &dyn Display, y: &dyn Display| {
            diffs.push(format!("{name}: {what} {x} in {an} but {y} in {bn}"));
        };
        match (&ea.kind, &eb.kind) {
            (EntryKind::Dir, EntryKind::Dir) => {}
            (EntryKind::File { size: sa }, EntryKind::File { size: sb }) => {
                if sa != sb {
                    differ("size", sa, sb);
                } else {
                    let ha = b3sum(&source_path(a, ea))?;
                    let hb = b3sum(&source_path(b, eb))?;
                    if ha != hb {
                        differ("contents (blake3)", &ha.to_hex(), &hb.to_hex());
                    }
                }
            }
            (EntryKind::Symlink { target: ta }, EntryKind::Symlink { target: tb }) => {
                if ta != tb {
                    differ("symlink target", &show(ta), &show(tb));
                }
            }
            (ka, kb) => {
                differ("kind", &kind_name(ka), &kind_name(kb));
                continue;
            }
        }
        if ea.mode != eb.mode {
            differ(
                "mode",
                &format_args!("{:04o}", ea.mode),
                &format_args!("{:04o}", eb.mode),
            );
        }
        if (ea.mtime_sec, ea.mtime_nsec) != (eb.mtime_sec, eb.mtime_nsec) {
            differ(
                "mtime",
                &format_args!("{}.{:09}", ea.mtime_sec, ea.mtime_nsec),
                &format_args!("{}.{:09}", eb.mtime_sec, eb.mtime_nsec),
            );
        }
    }

    let in_a: HashMap<&[u8], ()> = ma.iter().map(|e| (&e.path[..], ())).collect();
    for eb in &mb {
        if !in_a.contains_key(&eb.path[..]) {
            diffs.push(format!("{}: only in {bn}", show(&eb.path)));
        }
    }
    Ok(diffs)
}

/// The blake3 hash of a file's contents: what `b3sum` prints for it.
pub fn b3sum(path: &Path) -> io::Result<blake3::Hash> {
    let mut file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("read {}: {e}", path.display()),
                ))
            }
        }
    }
    Ok(hasher.finalize())
}

fn into_io(e: ScanError) -> io::Error {
    let kind = match &e {
        ScanError::NotFound { .. } => io::ErrorKind::NotFound,
        ScanError::PermissionDenied { .. } => io::ErrorKind::PermissionDenied,
        ScanError::NotADirectory { .. } => io::ErrorKind::NotADirectory,
        ScanError::Io { source, .. } => source.kind(),
        ScanError::Manifest { .. } => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

/// A manifest path for a message: `.` for the root, odd bytes escaped (`\n`, `\xff`).
fn show(path: &[u8]) -> String {
    if path.is_empty() {
        ".".to_string()
    } else {
        format!("\"{}\"", path.escape_ascii())
    }
}

fn kind_name(k: &EntryKind) -> &'static str {
    match k {
        EntryKind::Dir => "directory",
        EntryKind::File { .. } => "file",
        EntryKind::Symlink { .. } => "symlink",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::Command;

    use filetime::FileTime;

    use crate::scan::tests::{make_tree, pattern};

    fn two_copies(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (a, b) = (tmp.join("a"), tmp.join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        make_tree(&a);
        make_tree(&b);
        (a, b)
    }

    #[test]
    fn identical_trees_have_no_differences() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = two_copies(tmp.path());
        assert_eq!(compare_trees(&a, &b).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn reports_a_changed_byte_mode_and_mtime() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = two_copies(tmp.path());
        let big = b.join("big");
        let t = FileTime::from_last_modification_time(&fs::metadata(&big).unwrap());
        let mut data = fs::read(&big).unwrap();
        data[4_000_000] ^= 1;
        fs::write(&big, data).unwrap();
        filetime::set_file_mtime(&big, t).unwrap();
        fs::set_permissions(b.join("a/with space"), fs::Permissions::from_mode(0o644)).unwrap();
        let deep = b.join("a/b/c/deep.txt");
        let t = FileTime::from_last_modification_time(&fs::metadata(&deep).unwrap());
        filetime::set_file_mtime(&deep, FileTime::from_unix_time(t.unix_seconds(), 5)).unwrap();

        let diffs = compare_trees(&a, &b).unwrap();
        assert_eq!(diffs.len(), 3, "{diffs:#?}");
        assert!(
            diffs[0].starts_with("\"a/b/c/deep.txt\": mtime "),
            "{diffs:#?}"
        );
        assert!(diffs[0].contains(".000000005 in "), "{diffs:#?}");
        assert!(
            diffs[1].starts_with("\"a/with space\": mode 0640 in "),
            "{diffs:#?}"
        );
        assert!(
            diffs[2].starts_with("\"big\": contents (blake3) "),
            "{diffs:#?}"
        );
    }

    #[test]
    fn reports_structure_root_and_link_differences() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = two_copies(tmp.path());
        fs::remove_file(b.join("empty")).unwrap();
        fs::write(b.join("extra"), b"").unwrap();
        fs::remove_file(b.join("to-etc")).unwrap();
        symlink("/tmp", b.join("to-etc")).unwrap();
        fs::write(b.join("a/new\nline"), b"longer contents").unwrap();
        fs::set_permissions(&b, fs::Permissions::from_mode(0o700)).unwrap();
        fs::remove_dir(b.join("empty dir")).unwrap();
        fs::write(b.join("empty dir"), b"").unwrap();

        let diffs = compare_trees(&a, &b).unwrap().join("\n");
        for want in [
            ".: mode 0750",
            "\"empty\": missing from",
            "\"extra\": only in",
            "\"to-etc\": symlink target \"/etc\" in",
            "\"a/new\\nline\": size 12 in",
            "\"empty dir\": kind directory in",
        ] {
            assert!(diffs.contains(want), "{want:?} not in\n{diffs}");
        }
        // The root's mtime moved too, when entries were added and removed.
        assert!(diffs.contains(".: mtime"), "{diffs}");
    }

    #[test]
    fn b3sum_matches_the_reference_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        let data = pattern(3 * 1024 * 1024 + 5, 11);
        fs::write(&p, &data).unwrap();
        assert_eq!(b3sum(&p).unwrap(), blake3::hash(&data));
        // Check against the real b3sum where it is installed.
        if let Ok(out) = Command::new("b3sum").arg("--no-names").arg(&p).output() {
            if out.status.success() {
                let hex = String::from_utf8_lossy(&out.stdout).trim().to_string();
                assert_eq!(hex, b3sum(&p).unwrap().to_hex().as_str());
            }
        }
        let err = b3sum(&tmp.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
