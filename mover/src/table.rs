//! Tables ([`mover_protocol::table::Table`]: per-chunk records, and the manifest's entries) in
//! unlinked files under the agent's state directory: the page cache holds what is hot, the
//! process keeps none of it, and nothing is left behind when the process ends however it
//! ends.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mover_protocol::table::{MemTable, Table};

/// A table in a file that has no name, in `dir`.
#[derive(Debug)]
pub(crate) struct FileTable {
    file: File,
    dir: PathBuf,
    what: &'static str,
}

impl FileTable {
    /// A new, empty table in `dir`, for `what` (named in errors).
    pub fn create_in(dir: &Path, what: &'static str) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            file: tempfile::tempfile_in(dir)?,
            dir: dir.to_owned(),
            what,
        })
    }

    /// `e` with the directory named: the file has no name, and a full or failing disk there
    /// is what the operator has to look at.
    fn in_dir(&self, op: &str, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!(
                "{op} the table of {} (an unnamed file in {}): {e}",
                self.what,
                self.dir.display()
            ),
        )
    }
}

impl Table for FileTable {
    fn read_at(&self, pos: u64, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            match self.file.read_at(&mut out[done..], pos + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.in_dir("read", e)),
            }
        }
        // Past the end of the file: never written.
        out[done..].fill(0);
        Ok(())
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.file
            .write_all_at(data, pos)
            .map_err(|e| self.in_dir("write", e))
    }
}

/// A table in `dir`, or in memory (with a warning naming what failed) when no file can be
/// made there: `what` says what the table is for.
pub(crate) fn table_in(dir: &Path, what: &'static str) -> Box<dyn Table> {
    match FileTable::create_in(dir, what) {
        Ok(t) => Box::new(t),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, what,
                "cannot make a table file in the state directory; keeping it in memory (it grows with the dataset)");
            Box::<MemTable>::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_file_table_reads_zeros_past_what_was_written_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = FileTable::create_in(&dir.path().join("state"), "a test").unwrap();
        t.write_at(10, &[1, 2, 3]).unwrap();
        let mut out = [9u8; 8];
        t.read_at(8, &mut out).unwrap();
        assert_eq!(out, [0, 0, 1, 2, 3, 0, 0, 0]);
        t.read_at(1 << 30, &mut out).unwrap();
        assert_eq!(out, [0; 8]);
        assert_eq!(
            std::fs::read_dir(dir.path().join("state")).unwrap().count(),
            0,
            "the table's file has no name"
        );
    }
}
