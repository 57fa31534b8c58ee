//! The io_uring disk back end: one dedicated thread owns a ring and keeps up to its queue
//! depth of reads and writes in flight.
//!
//! Callers send requests over a channel and poke an eventfd; the thread always has a read of
//! that eventfd in flight, so a new request wakes it even while it waits for completions.
//! Each request lives in a slot (its index is the ring's `user_data`) that owns the file and
//! the buffer until the last completion for it, so the kernel never sees a freed or moved
//! buffer. Short reads and writes, `EINTR` and `EAGAIN` are resubmitted for the rest.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::oneshot;

use super::{Disk, Pending, SourceCache};
use crate::pool::PoolBuf;

/// `user_data` of the eventfd read.
const WAKE: u64 = u64::MAX;
/// The most one read or write asks for; longer requests go in several steps.
const MAX_STEP: usize = 1 << 30;

/// The io_uring back end.
#[derive(Debug)]
pub struct Uring {
    requests: mpsc::Sender<Request>,
    wake: Arc<OwnedFd>,
}

#[derive(Debug)]
struct Request {
    file: Arc<File>,
    offset: u64,
    /// Bytes already done.
    done: usize,
    work: Work,
}

#[derive(Debug)]
enum Work {
    Read {
        buf: PoolBuf,
        flags: i32,
        cache: SourceCache,
        reply: oneshot::Sender<io::Result<(PoolBuf, usize)>>,
    },
    Write {
        data: Bytes,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

impl Uring {
    /// Sets up a ring of `depth` requests and checks that it runs reads and writes; on failure
    /// says why (the reason is shown to the operator).
    pub fn start(depth: u32) -> Result<Self, String> {
        let ring = probe(depth)?;
        // SAFETY: eventfd(2) has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (tx, rx) = mpsc::channel();
        let driver = Driver {
            ring,
            requests: rx,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as usize).rev().collect(),
            wake: wake.clone(),
            closed: false,
        };
        std::thread::Builder::new()
            .name("mover-uring".into())
            .spawn(move || driver.run())
            .map_err(|e| format!("start the io_uring thread: {e}"))?;
        Ok(Self { requests: tx, wake })
    }

    fn send(&self, r: Request) {
        // A send fails only when the driver is gone; the dropped reply then reports it.
        if self.requests.send(r).is_ok() {
            poke(&self.wake);
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The channel closes when `requests` is dropped; the poke makes the driver see it.
        let (dead, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.requests, dead));
        poke(&self.wake);
    }
}

fn poke(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
}

impl Disk for Uring {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn read(
        &self,
        file: Arc<File>,
        offset: u64,
        buf: PoolBuf,
        cache: SourceCache,
    ) -> Pending<(PoolBuf, usize)> {
        let (reply, pending) = Pending::channel();
        self.send(Request {
            file,
            offset,
            done: 0,
            work: Work::Read {
                buf,
                flags: super::read_flags(cache),
                cache,
                reply,
            },
        });
        pending
    }

    fn write(&self, file: Arc<File>, offset: u64, data: Bytes) -> Pending<()> {
        let (reply, pending) = Pending::channel();
        self.send(Request {
            file,
            offset,
            done: 0,
            work: Work::Write { data, reply },
        });
        pending
    }
}

/// Creates a ring and checks that the kernel runs a NOP and has the read and write opcodes;
/// this is where seccomp, `kernel.io_uring_disabled` or an old kernel show up.
fn probe(depth: u32) -> Result<IoUring, String> {
    // Room for every request, the eventfd read, and resubmissions queued in one pass.
    let ring = IoUring::new((depth + 1).next_power_of_two() * 2)
        .map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("io_uring probe failed (kernel older than 5.6?): {e}"))?;
    for (code, name) in [(opcode::Read::CODE, "READ"), (opcode::Write::CODE, "WRITE")] {
        if !p.is_supported(code) {
            return Err(format!("the kernel's io_uring lacks IORING_OP_{name}"));
        }
    }
    let mut ring = ring;
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP refers to no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| "the new ring is full".to_owned())?;
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter failed: {e}"))?;
    let res = ring.completion().next().map(|c| c.result());
    match res {
        Some(0) => Ok(ring),
        Some(r) => Err(format!(
            "a NOP failed: {}",
            io::Error::from_raw_os_error(-r)
        )),
        None => Err("a NOP did not complete".into()),
    }
}

struct Driver {
    ring: IoUring,
    requests: mpsc::Receiver<Request>,
    slots: Vec<Option<Request>>,
    free: Vec<usize>,
    wake: Arc<OwnedFd>,
    closed: bool,
}

impl Driver {
    fn run(mut self) {
        // The eventfd read's buffer must outlive any read the kernel may still complete into
        // it, even after this thread's ring is gone: 8 bytes leaked once per back end.
        let wake_buf: &'static mut u64 = Box::leak(Box::new(0));
        let wake_buf: *mut u64 = wake_buf;
        self.arm_wake(wake_buf);
        loop {
            self.take_requests();
            if self.closed && self.free.len() == self.slots.len() {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: the completion queue is full; reaping below makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; failing every request in flight");
                    return;
                }
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (user_data, res) in done {
                if user_data == WAKE {
                    self.arm_wake(wake_buf);
                } else {
                    self.complete(user_data as usize, res);
                }
            }
        }
    }

    fn arm_wake(&mut self, buf: *mut u64) {
        let e = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(WAKE);
        self.push(&e);
    }

    /// Starts queued requests while there are free slots.
    fn take_requests(&mut self) {
        while !self.closed {
            let Some(&slot) = self.free.last() else {
                return;
            };
            match self.requests.try_recv() {
                Ok(r) => {
                    self.free.pop();
                    self.slots[slot] = Some(r);
                    self.submit(slot);
                }
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => self.closed = true,
            }
        }
    }

    /// Queues the next step of the request in `slot`.
    fn submit(&mut self, slot: usize) {
        let Some(r) = self.slots[slot].as_mut() else {
            return;
        };
        let fd = types::Fd(r.file.as_raw_fd());
        let at = r.offset + r.done as u64;
        let e = match &mut r.work {
            Work::Read { buf, flags, .. } => {
                let rest = &mut buf[r.done..];
                let len = rest.len().min(MAX_STEP) as u32;
                opcode::Read::new(fd, rest.as_mut_ptr(), len)
                    .offset(at)
                    .rw_flags(*flags)
                    .build()
            }
            Work::Write { data, .. } => {
                let rest = &data[r.done..];
                let len = rest.len().min(MAX_STEP) as u32;
                opcode::Write::new(fd, rest.as_ptr(), len)
                    .offset(at)
                    .build()
            }
        };
        // ASYNC: run on the kernel's io-wq workers rather than inline in this thread, so that
        // page-cache copies of several requests happen on several cores at once.
        self.push(&e.user_data(slot as u64).flags(squeue::Flags::ASYNC));
    }

    fn push(&mut self, e: &squeue::Entry) {
        loop {
            // SAFETY: every entry points into memory that stays put until its completion: a
            // slot's buffer (heap memory the slot owns and does not resize) and file, or the
            // leaked eventfd buffer.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return;
            }
            // Full: hand what is queued to the kernel, then there is room.
            if let Err(err) = self.ring.submit() {
                if err.raw_os_error() != Some(libc::EINTR)
                    && err.raw_os_error() != Some(libc::EBUSY)
                {
                    tracing::error!(error = %err, "io_uring submit failed");
                }
            }
        }
    }

    /// Handles one completion of the request in `slot`: resubmits the rest or answers.
    fn complete(&mut self, slot: usize, res: i32) {
        let Some(r) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let len = match &r.work {
            Work::Read { buf, .. } => buf.len(),
            Work::Write { data, .. } => data.len(),
        };
        let outcome = if res < 0 {
            match -res {
                libc::EINTR | libc::EAGAIN => None,
                errno => match &mut r.work {
                    Work::Read { flags, .. } if *flags != 0 && super::dontcache_refused(errno) => {
                        super::note_dontcache(false);
                        *flags = 0;
                        None
                    }
                    _ => Some(Err(io::Error::from_raw_os_error(errno))),
                },
            }
        } else if res == 0 {
            match r.work {
                Work::Read { .. } => Some(Ok(())),
                Work::Write { .. } => Some(Err(io::Error::from(io::ErrorKind::WriteZero))),
            }
        } else {
            r.done += res as usize;
            (r.done >= len).then_some(Ok(()))
        };
        match outcome {
            None => self.submit(slot),
            Some(result) => {
                let Some(r) = self.slots[slot].take() else {
                    return;
                };
                self.free.push(slot);
                answer(r, result);
            }
        }
    }
}

fn answer(r: Request, result: io::Result<()>) {
    match r.work {
        Work::Read {
            buf,
            flags,
            cache,
            reply,
        } => {
            if result.is_ok() && cache == SourceCache::Drop {
                if flags != 0 {
                    super::note_dontcache(true);
                } else {
                    super::drop_cached(&r.file, r.offset, r.done);
                }
            }
            let _ = reply.send(result.map(|()| (buf, r.done)));
        }
        Work::Write { reply, .. } => {
            let _ = reply.send(result);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Requests still in a slot here were not completed (the ring failed). Their buffers
        // and files may still be in the kernel's hands, so they are leaked rather than freed;
        // their callers get an error.
        for r in self.slots.iter_mut().filter_map(Option::take) {
            std::mem::forget(r.file);
            match r.work {
                Work::Read { buf, reply, .. } => {
                    std::mem::forget(buf);
                    let _ = reply.send(Err(super::stopped()));
                }
                Work::Write { data, reply } => {
                    std::mem::forget(data);
                    let _ = reply.send(Err(super::stopped()));
                }
            }
        }
    }
}
