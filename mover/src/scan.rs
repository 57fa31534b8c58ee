//! Scanning a dataset directory into a manifest, without ever following a symlink.
//!
//! The walk is depth-first, parents before children, children in the byte order of their
//! names, so the same tree always gives the same manifest. Every entry is `lstat`ed: a symlink
//! becomes a `Symlink` entry holding its raw target bytes (even when it points outside the
//! tree or nowhere), and no directory is entered through a link. Sockets, FIFOs and device
//! nodes cannot be copied as data, so they are left out and listed in [`Scan::skipped`].
//! Hard links are not detected: each name is scanned (and later copied) as its own file.
//!
//! The source is expected to be quiet (a stopped database or a snapshot); an entry that
//! vanishes or changes kind while the walk runs is reported as an error, not skipped.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use mover_protocol::manifest::{Entry, EntryKind, Manifest, ManifestBuilder, ManifestError};
use mover_protocol::table::{MemTable, Table};

/// What a scan found.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Every directory, regular file and symlink under the root, root first.
    pub manifest: Manifest,
    /// Sockets, FIFOs and device nodes that were left out, as full paths.
    pub skipped: Vec<PathBuf>,
}

/// Why a directory could not be scanned. Retrying helps only once the cause is fixed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("scan {}: it does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("scan {}: it is {found}, not a directory", path.display())]
    NotADirectory { path: PathBuf, found: &'static str },
    #[error("scan {}: permission denied", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("scan {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("scan {}: {source}", root.display())]
    Manifest {
        root: PathBuf,
        source: ManifestError,
    },
}

impl ScanError {
    fn from_io(path: &Path, source: io::Error) -> Self {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound => Self::NotFound { path },
            io::ErrorKind::PermissionDenied => Self::PermissionDenied { path },
            io::ErrorKind::NotADirectory => Self::NotADirectory {
                path,
                found: "not a directory (or a path component is not one)",
            },
            _ => Self::Io { path, source },
        }
    }
}

/// Scans the directory `root` into a validated manifest kept in memory (for tests and tools
/// that look at small trees).
pub fn scan(root: &Path) -> Result<Scan, ScanError> {
    scan_in(root, Arc::new(MemTable::default()), &std::env::temp_dir())
}

/// Scans the directory `root` into a validated manifest kept in `table`: each entry is
/// checked and stored as it is found, so the process holds only the walk's open
/// directories. A directory of more than [`NAMES_IN_MEMORY`] names is sorted through an
/// unnamed file in `spill_dir`.
pub fn scan_in(root: &Path, table: Arc<dyn Table>, spill_dir: &Path) -> Result<Scan, ScanError> {
    walk(root, table, spill_dir, NAMES_IN_MEMORY)
}

fn walk(
    root: &Path,
    table: Arc<dyn Table>,
    spill_dir: &Path,
    max_names: usize,
) -> Result<Scan, ScanError> {
    let children = |dir: &Path| sorted_children(dir, spill_dir, max_names);
    let meta = fs::symlink_metadata(root).map_err(|e| ScanError::from_io(root, e))?;
    if !meta.is_dir() {
        return Err(ScanError::NotADirectory {
            path: root.to_path_buf(),
            found: describe_non_dir(&meta),
        });
    }
    let refused = |source| ScanError::Manifest {
        root: root.to_path_buf(),
        source,
    };
    let mut entries = ManifestBuilder::in_table(table);
    entries
        .add(entry(Vec::new(), EntryKind::Dir, &meta))
        .map_err(refused)?;
    let mut total_bytes = 0u64;
    let mut skipped = Vec::new();

    // One frame per open directory: its path, its manifest path, and its children still to
    // visit (reversed, so `pop` yields them in ascending order).
    let mut stack = vec![(root.to_path_buf(), Vec::new(), children(root)?)];
    while let Some((dir, rel, names)) = stack.last_mut() {
        let Some(name) = names.pop().map_err(|e| ScanError::from_io(dir, e))? else {
            stack.pop();
            continue;
        };
        let abs = dir.join(OsStr::from_bytes(&name));
        let mut child_rel = Vec::with_capacity(rel.len() + 1 + name.len());
        if !rel.is_empty() {
            child_rel.extend_from_slice(rel);
            child_rel.push(b'/');
        }
        child_rel.extend_from_slice(&name);

        let meta = fs::symlink_metadata(&abs).map_err(|e| ScanError::from_io(&abs, e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            entries
                .add(entry(child_rel.clone(), EntryKind::Dir, &meta))
                .map_err(refused)?;
            let grandchildren = children(&abs)?;
            stack.push((abs, child_rel, grandchildren));
        } else if ft.is_file() {
            let kind = EntryKind::File { size: meta.len() };
            total_bytes = total_bytes.saturating_add(meta.len());
            entries
                .add(entry(child_rel, kind, &meta))
                .map_err(refused)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&abs)
                .map_err(|e| ScanError::from_io(&abs, e))?
                .into_os_string()
                .into_vec();
            entries
                .add(entry(
                    child_rel,
                    EntryKind::Symlink {
                        target: target.into(),
                    },
                    &meta,
                ))
                .map_err(refused)?;
        } else {
            skipped.push(abs);
        }
    }

    let count = entries.len() as u64;
    let manifest: Manifest = entries.finish(count, total_bytes).map_err(refused)?;
    Ok(Scan { manifest, skipped })
}

/// Where `entry` lives under `root`: `root` itself for the root entry.
pub fn source_path(root: &Path, entry: &Entry) -> PathBuf {
    if entry.path.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(&entry.path))
    }
}

/// Names of one directory sorted in memory (about 30 bytes each); a directory with more is
/// sorted in runs of this many, written to an unnamed file and merged, so that a directory
/// of tens of millions of names costs about 30 MiB, and 64 KiB per run.
pub const NAMES_IN_MEMORY: usize = 1 << 20;

/// Bytes read from a run at a time while runs are merged.
const RUN_READ: usize = 64 << 10;

/// A directory's names, to be visited in byte order.
enum Names {
    /// In one buffer, each ended by a NUL (which no name holds), with an offset per name in
    /// descending order of the names (`pop` takes the smallest): about 30 bytes a name
    /// rather than 60 with a `Vec` each.
    Memory { buf: Vec<u8>, order: Vec<usize> },
    /// Sorted runs in a file, merged: the next name of each run, smallest first.
    Runs {
        runs: Vec<Run>,
        next: BinaryHeap<Reverse<(Vec<u8>, usize)>>,
    },
}

/// One sorted run of NUL-ended names, read from its file a piece at a time.
struct Run {
    file: Arc<File>,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
}

impl Run {
    fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(n) = self.buf[self.at..].iter().position(|&b| b == 0) {
                let name = self.buf[self.at..self.at + n].to_vec();
                self.at += n + 1;
                return Ok(Some(name));
            }
            if self.pos >= self.end {
                return Ok(None);
            }
            self.buf.drain(..self.at);
            self.at = 0;
            let have = self.buf.len();
            let want = (self.end - self.pos).min(RUN_READ as u64) as usize;
            self.buf.resize(have + want, 0);
            self.file.read_exact_at(&mut self.buf[have..], self.pos)?;
            self.pos += want as u64;
        }
    }
}

impl Names {
    fn name_at(buf: &[u8], at: usize) -> &[u8] {
        let rest = &buf[at..];
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// The next name in byte order.
    fn pop(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self {
            Self::Memory { buf, order } => {
                Ok(order.pop().map(|at| Self::name_at(buf, at).to_vec()))
            }
            Self::Runs { runs, next } => {
                let Some(Reverse((name, r))) = next.pop() else {
                    return Ok(None);
                };
                if let Some(run) = runs.get_mut(r) {
                    if let Some(following) = run.next()? {
                        next.push(Reverse((following, r)));
                    }
                }
                Ok(Some(name))
            }
        }
    }
}

/// Runs written so far: the file, where it ends, and each run's place.
struct Spill {
    file: File,
    end: u64,
    runs: Vec<(u64, u64)>,
}

/// Sorts the names in `buf` (NUL-ended, starting at `order`) and appends them in order to
/// `file` at `*end` as one run, which it returns; empties `buf` and `order`.
fn write_run(
    file: &File,
    end: &mut u64,
    buf: &mut Vec<u8>,
    order: &mut Vec<usize>,
) -> io::Result<(u64, u64)> {
    order.sort_unstable_by(|&a, &b| Names::name_at(buf, a).cmp(Names::name_at(buf, b)));
    let start = *end;
    let mut out = Vec::with_capacity(RUN_READ);
    for &at in order.iter() {
        out.extend_from_slice(Names::name_at(buf, at));
        out.push(0);
        if out.len() >= RUN_READ {
            file.write_all_at(&out, *end)?;
            *end += out.len() as u64;
            out.clear();
        }
    }
    file.write_all_at(&out, *end)?;
    *end += out.len() as u64;
    buf.clear();
    order.clear();
    Ok((start, *end))
}

/// The names in `dir`, ready to be visited in ascending byte order; past `max_names`, sorted
/// through an unnamed file in `spill_dir`.
fn sorted_children(dir: &Path, spill_dir: &Path, max_names: usize) -> Result<Names, ScanError> {
    let (mut buf, mut order) = (Vec::new(), Vec::new());
    let mut spill: Option<Spill> = None;
    let spill_err = |e| ScanError::from_io(spill_dir, e);
    for item in fs::read_dir(dir).map_err(|e| ScanError::from_io(dir, e))? {
        let item = item.map_err(|e| ScanError::from_io(dir, e))?;
        order.push(buf.len());
        buf.extend_from_slice(item.file_name().as_bytes());
        buf.push(0);
        if order.len() >= max_names.max(1) {
            if spill.is_none() {
                fs::create_dir_all(spill_dir).map_err(spill_err)?;
                spill = Some(Spill {
                    file: tempfile::tempfile_in(spill_dir).map_err(spill_err)?,
                    end: 0,
                    runs: Vec::new(),
                });
            }
            if let Some(sp) = spill.as_mut() {
                let run = write_run(&sp.file, &mut sp.end, &mut buf, &mut order);
                sp.runs.push(run.map_err(spill_err)?);
            }
        }
    }
    let Some(Spill {
        file,
        mut end,
        runs: mut ranges,
    }) = spill
    else {
        order.sort_unstable_by(|&a, &b| Names::name_at(&buf, b).cmp(Names::name_at(&buf, a)));
        return Ok(Names::Memory { buf, order });
    };
    if !order.is_empty() {
        ranges.push(write_run(&file, &mut end, &mut buf, &mut order).map_err(spill_err)?);
    }
    let file = Arc::new(file);
    let mut runs = Vec::with_capacity(ranges.len());
    let mut next = BinaryHeap::with_capacity(ranges.len());
    for (r, (pos, end)) in ranges.into_iter().enumerate() {
        let mut run = Run {
            file: file.clone(),
            pos,
            end,
            buf: Vec::new(),
            at: 0,
        };
        if let Some(first) = run.next().map_err(spill_err)? {
            next.push(Reverse((first, r)));
        }
        runs.push(run);
    }
    Ok(Names::Runs { runs, next })
}

fn entry(path: Vec<u8>, kind: EntryKind, meta: &Metadata) -> Entry {
    Entry {
        path: path.into(),
        kind,
        mode: meta.mode() & 0o7777,
        mtime_sec: meta.mtime(),
        // The kernel keeps nanoseconds in 0..1e9, so this never clamps in practice.
        mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
    }
}

fn describe_non_dir(meta: &Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_symlink() {
        "a symlink (give the directory it points to instead)"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_fifo() {
        "a fifo"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a device node"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::fs::{symlink, PermissionsExt};

    use filetime::FileTime;

    /// Fills `len` bytes deterministically from `seed` (xorshift), so files differ.
    pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    pub(crate) fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}", path.display());
    }

    fn set_mtime(path: &Path, sec: i64, nsec: u32) {
        let t = FileTime::from_unix_time(sec, nsec);
        filetime::set_symlink_file_times(path, t, t).unwrap();
    }

    /// Builds the awkward tree the staging and compare tests copy. Returns the FIFO's path.
    pub(crate) fn make_tree(root: &Path) -> PathBuf {
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir(root.join("empty dir")).unwrap();
        fs::create_dir(root.join("ro")).unwrap();
        fs::write(root.join("big"), pattern(5 * 1024 * 1024 + 12_345, 7)).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("a/b/c/deep.txt"), b"deep\n").unwrap();
        fs::write(root.join("a/with space"), pattern(100_000, 3)).unwrap();
        fs::write(root.join("a/new\nline"), b"newline name").unwrap();
        fs::write(root.join(OsStr::from_bytes(b"a/bad\xff\xfename")), b"bytes").unwrap();
        fs::write(root.join("ro/readonly"), b"read only").unwrap();
        symlink("/etc", root.join("to-etc")).unwrap();
        symlink("no/such/target", root.join("a/dangling")).unwrap();
        let fifo = root.join("a/fifo");
        mkfifo(&fifo);

        fs::set_permissions(root.join("ro/readonly"), fs::Permissions::from_mode(0o400)).unwrap();
        fs::set_permissions(root.join("a/with space"), fs::Permissions::from_mode(0o640)).unwrap();
        // Times last, children before parents, so creating entries does not move them.
        let mut t = 1_500_000_000;
        for p in [
            "big",
            "empty",
            "a/b/c/deep.txt",
            "a/with space",
            "a/new\nline",
            "ro/readonly",
            "to-etc",
            "a/dangling",
            "a/b/c",
            "a/b",
            "a",
            "empty dir",
            "ro",
        ] {
            t += 1000;
            set_mtime(&root.join(p), t, 123_456_789);
        }
        set_mtime(
            &root.join(OsStr::from_bytes(b"a/bad\xff\xfename")),
            1_400_000_000,
            1,
        );
        fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(root, fs::Permissions::from_mode(0o750)).unwrap();
        set_mtime(root, 1_600_000_000, 999_999_999);
        fifo
    }

    fn find(m: &Manifest, p: &[u8]) -> Entry {
        m.iter()
            .map(Result::unwrap)
            .find(|e| &e.path[..] == p)
            .unwrap()
    }

    #[test]
    fn scans_an_awkward_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("src");
        fs::create_dir(&root).unwrap();
        let fifo = make_tree(&root);
        let s = scan(&root).unwrap();
        assert_eq!(s.skipped, vec![fifo]);

        let m = &s.manifest;
        let entries = m.to_vec().unwrap();
        let paths: Vec<&[u8]> = entries.iter().map(|e| &e.path[..]).collect();
        let expected: Vec<&[u8]> = vec![
            b"",
            b"a",
            b"a/b",
            b"a/b/c",
            b"a/b/c/deep.txt",
            b"a/bad\xff\xfename",
            b"a/dangling",
            b"a/new\nline",
            b"a/with space",
            b"big",
            b"empty",
            b"empty dir",
            b"ro",
            b"ro/readonly",
            b"to-etc",
        ];
        assert_eq!(paths, expected);

        let root_e = &m.get(0).unwrap();
        assert_eq!(
            (root_e.mode, root_e.mtime_sec, root_e.mtime_nsec),
            (0o750, 1_600_000_000, 999_999_999)
        );
        assert_eq!(
            find(m, b"big").kind,
            EntryKind::File {
                size: 5 * 1024 * 1024 + 12_345
            }
        );
        assert_eq!(find(m, b"empty").kind, EntryKind::File { size: 0 });
        assert_eq!(find(m, b"ro").mode, 0o555);
        assert_eq!(find(m, b"ro/readonly").mode, 0o400);
        assert_eq!(find(m, b"a/with space").mode, 0o640);
        assert_eq!(
            find(m, b"to-etc").kind,
            EntryKind::Symlink {
                target: b"/etc".to_vec().into()
            }
        );
        assert_eq!(
            find(m, b"a/dangling").kind,
            EntryKind::Symlink {
                target: b"no/such/target".to_vec().into()
            }
        );
        assert_eq!(find(m, b"to-etc").mtime_nsec, 123_456_789);
        assert_eq!(find(m, b"a/bad\xff\xfename").mtime_sec, 1_400_000_000);

        assert_eq!(source_path(&root, root_e), root);
        assert_eq!(source_path(&root, &find(m, b"a/b/c")), root.join("a/b/c"));
        // Scanning twice gives the same manifest.
        assert_eq!(scan(&root).unwrap().manifest, s.manifest);
    }

    #[test]
    fn refuses_a_root_that_is_not_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing");
        let err = scan(&missing).unwrap_err();
        assert!(matches!(err, ScanError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");

        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = scan(&file).unwrap_err();
        assert!(matches!(err, ScanError::NotADirectory { .. }), "{err}");
        assert!(err.to_string().contains("a regular file"), "{err}");

        let link = tmp.path().join("link");
        symlink(tmp.path(), &link).unwrap();
        let err = scan(&link).unwrap_err();
        assert!(err.to_string().contains("a symlink"), "{err}");
    }

    #[test]
    fn scans_an_empty_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let s = scan(tmp.path()).unwrap();
        assert_eq!(s.manifest.len(), 1);
        assert!(s.manifest.get(0).unwrap().path.is_empty());
        assert!(s.skipped.is_empty());
    }

    #[test]
    fn a_directory_past_the_names_kept_in_memory_is_sorted_through_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("d");
        fs::create_dir(&root).unwrap();
        // Names that are prefixes of others, and names around '/' and '.' in byte order.
        let mut names: Vec<String> = (0..200)
            .map(|i| format!("t{:03}", (i * 37) % 200))
            .collect();
        names.extend(["a", "a.b", "a0", "ab", "t", "t1", "\u{e9}", "Z"].map(String::from));
        for n in &names {
            fs::write(root.join(n), n.as_bytes()).unwrap();
        }
        fs::create_dir(root.join("a-dir")).unwrap();
        fs::write(root.join("a-dir/inner"), b"x").unwrap();
        let spill = tmp.path().join("spill");
        let mut sorted = sorted_children(&root, &spill, 7).unwrap();
        assert!(matches!(sorted, Names::Runs { .. }), "sorted in runs");
        let mut got = Vec::new();
        while let Some(n) = sorted.pop().unwrap() {
            got.push(n);
        }
        let mut want: Vec<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
        want.push(b"a-dir".to_vec());
        want.sort();
        assert_eq!(got, want);
        // The whole walk gives the same manifest either way, nothing left in the spill
        // directory (its file has no name).
        let in_runs = walk(&root, Arc::new(MemTable::default()), &spill, 3).unwrap();
        assert_eq!(in_runs.manifest, scan(&root).unwrap().manifest);
        assert_eq!(fs::read_dir(&spill).unwrap().count(), 0);
    }
}
