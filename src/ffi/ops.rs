//! The operations: each entry point describes its call as a [`RawCall`]; one function checks
//! every call against its communicator (`prepare`), one runs it (`run`): recorded in a group,
//! posted on host memory, or enqueued on a stream.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_int, c_void};

use super::group::*;
use super::handles::*;
use super::*;
use crate::api::error::Error;
use crate::api::request::Completion;
use crate::api::types::{DataType, ReduceOp};
use crate::api::world::World;
use crate::coll::OpDesc;
use crate::engine::wire::OpKind;
use crate::sys::buf::{ranges_overlap, RawBuf};
use crate::sys::sync::{lock, Arc};

/// What one C call asks for, before it is checked.
pub(super) struct RawCall {
    pub(super) kind: OpKind,
    pub(super) send: *const c_void,
    pub(super) recv: *mut c_void,
    pub(super) count: usize,
    pub(super) datatype: mwDataType_t,
    pub(super) op: mwRedOp_t,
    /// Root, or the peer of send/recv.
    pub(super) root: c_int,
    pub(super) is_send: bool,
}

impl RawCall {
    /// A collective (`op` is read only by reductions, `root` only by rooted operations).
    pub(super) fn collective(
        kind: OpKind,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        datatype: mwDataType_t,
        op: mwRedOp_t,
        root: c_int,
    ) -> RawCall {
        RawCall { kind, send, recv, count, datatype, op, root, is_send: false }
    }

    pub(super) fn send(send: *const c_void, count: usize, datatype: mwDataType_t, peer: c_int) -> RawCall {
        RawCall {
            kind: OpKind::P2p,
            send,
            recv: std::ptr::null_mut(),
            count,
            datatype,
            op: 0,
            root: peer,
            is_send: true,
        }
    }

    pub(super) fn recv(recv: *mut c_void, count: usize, datatype: mwDataType_t, peer: c_int) -> RawCall {
        RawCall { kind: OpKind::P2p, send: std::ptr::null(), recv, count, datatype, op: 0, root: peer, is_send: false }
    }
}

/// A checked call: the operation and its buffers as (address, bytes), host or device memory.
#[derive(Clone, Copy)]
pub(super) struct Checked {
    pub(super) desc: OpDesc,
    pub(super) send: (usize, usize),
    pub(super) recv: (usize, usize),
}

impl Checked {
    /// In a CUDA build, refuses device memory passed with a NULL stream (host memory): the
    /// host would fault on it.
    pub(super) fn check_host(&self) -> Result<(), Error> {
        #[cfg(feature = "cuda")]
        for (p, n) in [self.send, self.recv] {
            use cudarc::driver::sys::CUmemorytype;
            if n > 0 && crate::gpu::cuda::memory_type(p) == Some(CUmemorytype::CU_MEMORYTYPE_DEVICE) {
                return Err(Error::invalid_arg(format!(
                    "{}: {p:#x} is device memory, which needs a stream (a NULL stream means host memory)",
                    self.desc.kind.name()
                )));
            }
        }
        Ok(())
    }

    /// The operation on views of host buffers.
    ///
    /// # Safety
    /// The buffers are host memory that stays valid until the operation is done (the C
    /// caller's contract, as with NCCL).
    pub(super) unsafe fn host(&self) -> (OpDesc, RawBuf, RawBuf) {
        let ((sp, sl), (rp, rl)) = (self.send, self.recv);
        // SAFETY: the caller's contract; the lengths were computed from the count and checked
        // against overflow.
        unsafe { (self.desc, RawBuf::from_raw(sp as *mut u8, sl, false), RawBuf::from_raw(rp as *mut u8, rl, true)) }
    }
}

/// Checks a call against the communicator.
pub(super) fn prepare(c: &Comm, r: &RawCall) -> Result<Checked, Error> {
    let name = r.kind.name();
    // A communicator still being split off another knows its shape once it is made.
    let (rank, size) = c.shape()?;
    let bad = |m: String| Error::invalid_arg(format!("{name}: {m}"));
    let dtype = DataType::from_code(r.datatype as u32)
        .filter(|_| r.datatype >= 0)
        .ok_or_else(|| bad(format!("unknown data type {}", r.datatype)))?;
    let redop = if r.kind.reduces() {
        ReduceOp::from_code(r.op as u32)
            .filter(|_| r.op >= 0)
            .ok_or_else(|| bad(format!("unknown reduction {}", r.op)))?
    } else {
        ReduceOp::Sum
    };
    let root = if r.kind.rooted() || r.kind == OpKind::P2p {
        if r.root < 0 || r.root as usize >= size {
            return Err(bad(format!("rank {} is out of range for {size} ranks", r.root)));
        }
        r.root as usize
    } else {
        0
    };
    let e = dtype.size();
    let (send_p, recv_p) = (r.send as usize, r.recv as usize);
    let block = r.count.checked_mul(e).ok_or_else(|| bad("count overflows".into()))?;
    // NCCL's in-place layouts.
    let in_place = match r.kind {
        OpKind::AllReduce | OpKind::Broadcast | OpKind::Reduce => send_p == recv_p && send_p != 0,
        OpKind::AllGather => send_p != 0 && Some(send_p) == block.checked_mul(rank).and_then(|o| recv_p.checked_add(o)),
        OpKind::ReduceScatter => {
            recv_p != 0 && Some(recv_p) == block.checked_mul(rank).and_then(|o| send_p.checked_add(o))
        }
        _ => false,
    };
    let desc = OpDesc { kind: r.kind, dtype, redop, count: r.count, root, is_send: r.is_send, in_place };
    let too_big = || bad(format!("count overflows: {} elements of {dtype} are more bytes than PTRDIFF_MAX", r.count));
    let (slen, rlen) = desc.buffer_bytes_checked(rank, size).ok_or_else(too_big)?;
    if (slen > 0 && send_p == 0) || (rlen > 0 && recv_p == 0) {
        return Err(bad("a buffer is NULL".into()));
    }
    if send_p.checked_add(slen).is_none() || recv_p.checked_add(rlen).is_none() {
        return Err(bad("a buffer runs past the end of the address space".into()));
    }
    // In place, the one buffer starts where NCCL says the operation's full buffer starts.
    let recv_start = if in_place && r.kind == OpKind::ReduceScatter { send_p } else { recv_p };
    let (send, recv) = ((send_p, slen), (recv_start, rlen));
    if !in_place && ranges_overlap(send, recv) {
        return Err(bad("send and receive buffers overlap but are not the in-place layout".into()));
    }
    Ok(Checked { desc, send, recv })
}

/// Runs one call: records it in the current group, or posts it (and waits, on a blocking
/// communicator).
pub(super) fn run(comm: mwComm_t, call: RawCall, stream: *mut c_void) -> mwResult_t {
    let c = match lookup(comm) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let checked = match prepare(&c, &call) {
        Ok(x) => x,
        Err(e) => return c.record(&e),
    };
    if !stream.is_null() && !cfg!(feature = "cuda") {
        return c.record(&Error::invalid_arg(format!(
            "{}: a stream means device buffers, which need a build with the cuda feature (host buffers take a NULL stream)",
            call.kind.name()
        )));
    }
    if stream.is_null() {
        if let Err(e) = checked.check_host() {
            return c.record(&e);
        }
    }
    if in_group() {
        GROUP.with(|g| g.borrow_mut().ops.push((c, checked, stream as usize)));
        return mwSuccess;
    }
    if stream.is_null() {
        // SAFETY: host buffers under the C caller's contract.
        post(&c, vec![unsafe { checked.host() }])
    } else {
        device(&c, stream as usize, &[checked])
    }
}

/// Enqueues operations on device buffers on `stream` (builds with the `cuda` feature).
pub(super) fn device(c: &Comm, stream: usize, ops: &[Checked]) -> mwResult_t {
    #[cfg(feature = "cuda")]
    let r = c.enqueue_device(stream, ops);
    #[cfg(not(feature = "cuda"))]
    let r = {
        let _ = (stream, ops);
        Err(Error::invalid_arg("device buffers need a build with the cuda feature"))
    };
    match r {
        Ok(()) => mwSuccess,
        Err(e) => c.record(&e),
    }
}

pub(super) fn post(c: &Comm, ops: Vec<(OpDesc, RawBuf, RawBuf)>) -> mwResult_t {
    match start(c, ops) {
        Err(r) => r,
        Ok(None) => mwInProgress,
        Ok(Some((w, done))) => finish(c, &w, &done),
    }
}

/// Posts operations without waiting. For a blocking communicator, returns what to wait for;
/// for a non-blocking one, files them as pending.
#[allow(clippy::type_complexity)]
pub(super) fn start(
    c: &Comm,
    ops: Vec<(OpDesc, RawBuf, RawBuf)>,
) -> Result<Option<(World, Vec<Arc<Completion>>)>, mwResult_t> {
    let w = (if c.blocking { c.settle() } else { c.world() }).map_err(|e| c.record(&e))?;
    c.wait_device_posted();
    // SAFETY: the views come from `prepare`, under the C caller's contract that the buffers
    // stay valid until the operation is done.
    let done = unsafe { w.post_raw(ops, false) }.map_err(|e| c.record(&e))?;
    if c.blocking {
        Ok(Some((w, done)))
    } else {
        lock(&c.pending).extend(done);
        Ok(None)
    }
}

/// Waits for a blocking communicator's operations; the first error.
pub(super) fn finish(c: &Comm, w: &World, done: &[Arc<Completion>]) -> mwResult_t {
    w.wait_for(done);
    match done.iter().find_map(|k| k.result().and_then(|r| r.err())) {
        Some(e) => c.record(&e),
        None => mwSuccess,
    }
}

/// Sends `count` elements to `peer`, which posts a matching `mwRecv` (`ncclSend`).
#[no_mangle]
pub unsafe extern "C" fn mwSend(
    sendbuff: *const c_void,
    count: usize,
    datatype: mwDataType_t,
    peer: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::send(sendbuff, count, datatype, peer), stream))
}

/// Receives `count` elements from `peer` (`ncclRecv`).
#[no_mangle]
pub unsafe extern "C" fn mwRecv(
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    peer: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::recv(recvbuff, count, datatype, peer), stream))
}

/// Copies the root's `sendbuff` into every rank's `recvbuff` (`ncclBroadcast`; in place when
/// the two are equal).
#[no_mangle]
pub unsafe extern "C" fn mwBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    root: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::collective(OpKind::Broadcast, sendbuff, recvbuff, count, datatype, 0, root), stream))
}

/// Reduces every rank's `sendbuff` into the root's `recvbuff` (`ncclReduce`).
#[no_mangle]
pub unsafe extern "C" fn mwReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    op: mwRedOp_t,
    root: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::collective(OpKind::Reduce, sendbuff, recvbuff, count, datatype, op, root), stream))
}

/// Reduces every rank's `sendbuff`; every rank gets the result in `recvbuff`
/// (`ncclAllReduce`).
#[no_mangle]
pub unsafe extern "C" fn mwAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    op: mwRedOp_t,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::collective(OpKind::AllReduce, sendbuff, recvbuff, count, datatype, op, 0), stream))
}

/// Gathers `sendcount` elements from every rank into every rank's `recvbuff`, in rank order
/// (`ncclAllGather`).
#[no_mangle]
pub unsafe extern "C" fn mwAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: mwDataType_t,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::collective(OpKind::AllGather, sendbuff, recvbuff, sendcount, datatype, 0, 0), stream))
}

/// Reduces every rank's `sendbuff` (`recvcount` elements per rank); rank `r` gets block `r`
/// (`ncclReduceScatter`).
#[no_mangle]
pub unsafe extern "C" fn mwReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: mwDataType_t,
    op: mwRedOp_t,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        run(comm, RawCall::collective(OpKind::ReduceScatter, sendbuff, recvbuff, recvcount, datatype, op, 0), stream)
    })
}

/// Sends block `r` (of `count` elements) of `sendbuff` to rank `r`, which stores it as block
/// `rank` of its `recvbuff` (`ncclAlltoAll`).
#[no_mangle]
pub unsafe extern "C" fn mwAllToAll(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::collective(OpKind::AllToAll, sendbuff, recvbuff, count, datatype, 0, 0), stream))
}

/// Gathers `sendcount` elements from every rank into the root's `recvbuff` (`ncclGather`).
#[no_mangle]
pub unsafe extern "C" fn mwGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: mwDataType_t,
    root: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::collective(OpKind::Gather, sendbuff, recvbuff, sendcount, datatype, 0, root), stream))
}

/// Sends block `r` (of `recvcount` elements) of the root's `sendbuff` to rank `r`
/// (`ncclScatter`).
#[no_mangle]
pub unsafe extern "C" fn mwScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: mwDataType_t,
    root: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| run(comm, RawCall::collective(OpKind::Scatter, sendbuff, recvbuff, recvcount, datatype, 0, root), stream))
}

/// Returns once every rank has called it.
#[no_mangle]
pub unsafe extern "C" fn mwBarrier(comm: mwComm_t, stream: *mut c_void) -> mwResult_t {
    guard(|| {
        run(
            comm,
            RawCall::collective(OpKind::Barrier, std::ptr::null(), std::ptr::null_mut(), 0, mwUint8, 0, 0),
            stream,
        )
    })
}
