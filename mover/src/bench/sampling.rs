//! Which bytes of a dataset `mover bench` reads, how much of them the page cache already held,
//! and the compact copy of them that an end-to-end run sends.
//!
//! A sample is a list of [`Piece`]s: runs of bytes of the dataset's files. When the whole
//! dataset fits in the sample it is every file; otherwise [`SEGMENTS`] runs of equal length,
//! one in the middle of each of as many equal stretches of the dataset (its files laid end to
//! end), so that the sample sees large and small files, compressible and not, in the
//! proportions the dataset has them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Runs a sample is cut into when the dataset does not fit in it.
pub const SEGMENTS: u64 = 64;

/// A run of bytes of one file: `len` bytes from `offset` (a multiple of the chunk size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The file's index in the list the sample was planned from.
    pub file: usize,
    pub offset: u64,
    pub len: u64,
}

/// Plans a sample of at most `sample` bytes of files of sizes `sizes` (the order the files
/// are sent in). Pieces come in file order, never overlap, and start on `chunk` boundaries.
pub fn plan(sizes: &[u64], sample: u64, chunk: u32) -> Vec<Piece> {
    let chunk = u64::from(chunk.max(1));
    let total: u64 = sizes.iter().fold(0, |a, &s| a.saturating_add(s));
    if total <= sample {
        return sizes
            .iter()
            .enumerate()
            .filter(|(_, &s)| s > 0)
            .map(|(file, &len)| Piece {
                file,
                offset: 0,
                len,
            })
            .collect();
    }
    // Runs of at least a chunk each, so that every read is a whole chunk where files allow.
    let run = (sample / SEGMENTS).max(chunk).min(sample);
    if run == 0 {
        return Vec::new();
    }
    let runs = sample / run;
    let stride = total / runs;
    // starts[i]: where file i begins when the files are laid end to end.
    let mut starts = Vec::with_capacity(sizes.len());
    let mut at = 0u64;
    for &s in sizes {
        starts.push(at);
        at += s;
    }
    let mut pieces: Vec<Piece> = Vec::new();
    let mut taken = 0u64;
    for k in 0..runs {
        let global = k * stride + (stride - run) / 2;
        // The last file starting at or before `global` that has bytes there.
        let mut file = starts.partition_point(|&s| s <= global).saturating_sub(1);
        let mut offset = global - starts[file];
        offset -= offset % chunk;
        let mut want = run.min(sample - taken);
        while want > 0 && file < sizes.len() {
            if offset >= sizes[file] {
                file += 1;
                offset = 0;
                continue;
            }
            let len = want.min(sizes[file] - offset);
            push(&mut pieces, Piece { file, offset, len });
            taken += len;
            want -= len;
            file += 1;
            offset = 0;
        }
    }
    // Merging overlaps may have counted some bytes twice above; the pieces hold the truth.
    pieces
}

/// Appends `p`, merged with the last piece when they touch or overlap in the same file.
fn push(pieces: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = pieces.last_mut() {
        if last.file == p.file && p.offset <= last.offset + last.len {
            let end = (p.offset + p.len).max(last.offset + last.len);
            last.len = end - last.offset;
            return;
        }
    }
    pieces.push(p);
}

/// Bytes of `len` bytes at `offset` of `file` that are in the page cache now (`mincore` on a
/// read-only mapping, which reads nothing).
pub fn resident(file: &File, offset: u64, len: u64) -> io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let start = offset - offset % page;
    let span = usize::try_from(offset + len - start).map_err(io::Error::other)?;
    let pages = span.div_ceil(page as usize);
    // SAFETY: a fresh shared read-only mapping of an open file; nothing reads through it, and
    // it is unmapped below. Pages past the end of the file are never touched.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as libc::off_t,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` maps `span` bytes, and `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(addr, span, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, span) };
    if rc != 0 {
        return Err(err);
    }
    let cached = vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
    Ok((cached * page).min(len))
}

/// Copies the pieces of each file into a compact file of the same relative path under `dest`
/// (a fresh directory), one file's pieces one after another, and flushes its filesystem, so
/// that the transfer which sends the copy does not pay for writing it back (on one machine,
/// the targets' commits would). `files[i]` is file `i`'s source path and its path relative to
/// the dataset. Returns the bytes copied.
pub fn copy(files: &[(&Path, &Path)], pieces: &[Piece], dest: &Path) -> io::Result<u64> {
    fs::create_dir(dest)?;
    let mut copied = 0;
    let mut open: Option<(usize, File, File)> = None;
    for p in pieces {
        if open.as_ref().is_none_or(|(f, _, _)| *f != p.file) {
            let (src, rel) = files[p.file];
            let to = dest.join(rel);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent)?;
            }
            let from = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(src)?;
            let into = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&to)?;
            open = Some((p.file, from, into));
        }
        let Some((_, from, into)) = open.as_mut() else {
            continue;
        };
        from.seek(SeekFrom::Start(p.offset))?;
        let n = io::copy(&mut io::Read::take(&mut *from, p.len), into)?;
        copied += n;
    }
    if let Some((_, _, into)) = open.as_mut() {
        into.flush()?;
    }
    let dir = File::open(dest)?;
    // SAFETY: `dir` is an open descriptor for the whole call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(copied)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    fn total(p: &[Piece]) -> u64 {
        p.iter().map(|p| p.len).sum()
    }

    fn check(sizes: &[u64], sample: u64, chunk: u32) -> Vec<Piece> {
        let p = plan(sizes, sample, chunk);
        assert!(total(&p) <= sample, "{p:?}");
        for w in p.windows(2) {
            assert!(
                (w[0].file, w[0].offset + w[0].len) <= (w[1].file, w[1].offset),
                "out of order or overlapping: {w:?}"
            );
        }
        for x in &p {
            assert!(x.len > 0 && x.offset + x.len <= sizes[x.file], "{x:?}");
            assert_eq!(x.offset % u64::from(chunk), 0, "{x:?}");
        }
        p
    }

    #[test]
    fn a_dataset_that_fits_is_sampled_whole() {
        let sizes = [10, 0, 5 * MI, 3];
        let p = check(&sizes, 1 << 30, 1 << 20);
        assert_eq!(total(&p), 10 + 5 * MI + 3);
        assert_eq!(p.len(), 3, "empty files are left out: {p:?}");
    }

    #[test]
    fn a_large_dataset_is_sampled_all_over() {
        // One 10 GiB file, then 4000 small ones: the sample reaches both.
        let mut sizes = vec![10 << 30];
        sizes.extend(std::iter::repeat_n(64 << 10, 4000));
        let dataset: u64 = sizes.iter().sum();
        let p = check(&sizes, 1 << 30, 4 << 20);
        let got = total(&p);
        assert!(got > (1 << 30) * 9 / 10, "only {got} of a 1 GiB sample");
        let big: u64 = p.iter().filter(|x| x.file == 0).map(|x| x.len).sum();
        // About the share the big file has in the dataset.
        let share = (10u64 << 30) as f64 / dataset as f64;
        assert!(
            (big as f64 / got as f64 - share).abs() < 0.05,
            "{big} of {got}"
        );
        assert!(p.iter().any(|x| x.file > 2000), "no small file sampled");
        // Every stretch of the dataset has its run, the first one too.
        assert!(p
            .first()
            .is_some_and(|x| x.file == 0 && x.offset < dataset / SEGMENTS));
        assert!(p.len() as u64 >= SEGMENTS / 2, "{} runs", p.len());
    }

    #[test]
    fn small_samples_and_odd_sizes() {
        check(&[100 * MI], 1, 1 << 16);
        check(&[100 * MI, 7, 9 * MI + 1], 3 * MI, 1 << 20);
        check(&[1; 1000], 10, 1 << 16);
        assert!(plan(&[5 * MI], 0, 1 << 20).is_empty());
    }

    #[test]
    fn the_copy_holds_the_pieces_and_cache_residency_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(src.join("sub/a"), &a).unwrap();
        fs::write(src.join("b"), b"bee").unwrap();
        let files = [
            (src.join("sub/a"), Path::new("sub/a").to_path_buf()),
            (src.join("b"), Path::new("b").to_path_buf()),
        ];
        let refs: Vec<(&Path, &Path)> = files
            .iter()
            .map(|(s, r)| (s.as_path(), r.as_path()))
            .collect();
        let pieces = [
            Piece {
                file: 0,
                offset: 0,
                len: 1000,
            },
            Piece {
                file: 0,
                offset: 200_000,
                len: 100_000,
            },
            Piece {
                file: 1,
                offset: 0,
                len: 3,
            },
        ];
        let out = dir.path().join("out");
        assert_eq!(copy(&refs, &pieces, &out).unwrap(), 101_003);
        let got = fs::read(out.join("sub/a")).unwrap();
        assert_eq!(got.len(), 101_000);
        assert!(got[..1000] == a[..1000] && got[1000..] == a[200_000..]);
        assert_eq!(fs::read(out.join("b")).unwrap(), b"bee");
        // The destination must be new.
        assert!(copy(&refs, &pieces, &out).is_err());

        let f = File::open(src.join("sub/a")).unwrap();
        let r = resident(&f, 0, a.len() as u64).unwrap();
        assert!(r <= a.len() as u64);
        assert_eq!(resident(&f, 0, 0).unwrap(), 0);
    }
}
