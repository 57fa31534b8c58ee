//! A generator of realistic sample datasets, for the demo, the benchmarks and the tests.
//!
//! It lays out something that looks like a database's data directory: a few large table and
//! log files made of 16 KiB pages of rows (about 2-3x compressible with zstd -1, like real
//! tablespaces) and thousands of small files in per-schema directories.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

const PAGE: usize = 16 << 10;
const WORDS: &[&str] = &[
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "pending",
    "shipped",
    "cancelled",
    "refunded",
    "customer",
    "order",
    "invoice",
    "paris",
    "london",
    "berlin",
    "madrid",
    "rome",
];

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SampleSpec {
    /// Approximate total size in bytes.
    pub size: u64,
    /// How many small files (a few KiB each).
    pub small_files: u32,
    pub seed: u64,
}

impl Default for SampleSpec {
    fn default() -> Self {
        Self {
            size: 1 << 30,
            small_files: 4000,
            seed: 42,
        }
    }
}

/// Fills `page` with rows: binary keys, words and digits, and a little free space.
fn fill_page(rng: &mut fastrand::Rng, page: &mut [u8]) {
    let mut i = 0;
    // A page header that differs per page.
    for b in page.iter_mut().take(38) {
        *b = rng.u8(..);
    }
    i += 38;
    let free = rng.usize(..PAGE / 8);
    let end = page.len() - free;
    while i + 64 < end {
        for _ in 0..8 {
            page[i] = rng.u8(..);
            i += 1;
        }
        for _ in 0..3 {
            let w = WORDS[rng.usize(..WORDS.len())].as_bytes();
            page[i..i + w.len()].copy_from_slice(w);
            i += w.len();
            page[i] = b' ';
            i += 1;
        }
        for _ in 0..8 {
            page[i] = b'0' + rng.u8(..10);
            i += 1;
        }
        page[i] = b'\n';
        i += 1;
    }
    page[i..].fill(0);
}

fn write_pages(rng: &mut fastrand::Rng, path: &Path, size: u64) -> io::Result<()> {
    let mut f = io::BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut page = vec![0u8; PAGE];
    let mut left = size;
    while left > 0 {
        fill_page(rng, &mut page);
        let n = left.min(PAGE as u64) as usize;
        f.write_all(&page[..n])?;
        left -= n as u64;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_data()
}

/// `len` bytes of table pages, as the large files of a sample dataset hold.
pub fn pages(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(len + PAGE);
    let mut page = vec![0u8; PAGE];
    while out.len() < len {
        fill_page(&mut rng, &mut page);
        out.extend_from_slice(&page);
    }
    out.truncate(len);
    out
}

/// Generates a sample data directory at `root` (created; must not exist or be empty).
/// Returns the number of files written.
pub fn generate(root: &Path, spec: SampleSpec) -> io::Result<u64> {
    let mut rng = fastrand::Rng::with_seed(spec.seed);
    fs::create_dir_all(root)?;
    let mut files = 0u64;
    // Small files: about 8 KiB each on average, spread over schema directories.
    let small_total: u64 = u64::from(spec.small_files) * 8192;
    let schemas = (spec.small_files / 500).max(1);
    for s in 0..schemas {
        fs::create_dir_all(root.join(format!("schema_{s:02}")))?;
    }
    let mut page = vec![0u8; PAGE];
    for i in 0..spec.small_files {
        let dir = root.join(format!("schema_{:02}", i % schemas));
        let len = rng.usize(..PAGE);
        fill_page(&mut rng, &mut page);
        let ext = ["frm", "ibd", "MYD", "opt"][i as usize % 4];
        fs::write(dir.join(format!("t{i:05}.{ext}")), &page[..len])?;
        files += 1;
    }
    // Large files share what is left: a system tablespace, two logs, and table files.
    let large = spec.size.saturating_sub(small_total);
    let parts: [(&str, u64); 5] = [
        ("ibdata1", 30),
        ("ib_logfile0", 10),
        ("ib_logfile1", 10),
        ("schema_00/orders.ibd", 30),
        ("schema_00/customers.ibd", 20),
    ];
    for (name, pct) in parts {
        write_pages(&mut rng, &root.join(name), large * pct / 100)?;
        files += 1;
    }
    // Things a copy must keep exactly: an empty file, an empty directory, a symlink.
    fs::write(root.join("mysql.sock.lock"), b"")?;
    fs::create_dir_all(root.join("tmp"))?;
    std::os::unix::fs::symlink("ibdata1", root.join("ibdata.link"))?;
    Ok(files + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_compressible_tree_of_about_the_right_size() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("data");
        let files = generate(
            &root,
            SampleSpec {
                size: 8 << 20,
                small_files: 50,
                seed: 1,
            },
        )
        .unwrap();
        assert_eq!(files, 56);
        let scan = crate::scan::scan(&root).unwrap();
        let total = scan.manifest.total_bytes();
        assert!((7 << 20..=9 << 20).contains(&total), "{total}");
        let data = fs::read(root.join("ibdata1")).unwrap();
        let z = zstd::bulk::compress(&data, 1).unwrap();
        let ratio = data.len() as f64 / z.len() as f64;
        assert!((1.5..5.0).contains(&ratio), "zstd -1 ratio {ratio}");
    }
}
