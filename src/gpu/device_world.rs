//! Collectives on cudarc device buffers, ordered on a CUDA stream (feature `cuda`).
//!
//! [`DeviceWorld`] reads like cudarc's NCCL `Comm`: it binds a world to a stream, takes cudarc
//! device buffers in the same positions, and each call only *enqueues* its work on the stream
//! and returns, as NCCL does. The work goes through `gpu/staging/`, whose stream flags are
//! always released by this process, so a failed peer never holds the stream: the failure is
//! reported by [`DeviceWorld::error`], [`DeviceWorld::synchronize`] and the next call.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::api::error::{Error, ErrorKind, Result};
use crate::api::types::{DataType, Element, ReduceOp};
use crate::api::world::World;
use crate::coll::OpDesc;
use crate::engine::wire::OpKind;
use crate::gpu::cuda::RawContext;
use crate::gpu::device::DeviceBackend;
use crate::gpu::staging::DeviceOp;
use crate::sys::sync::Arc;

/// Counts of a [`DeviceWorld`]'s operations through CUDA IPC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcStats {
    /// Receives whose stream copied straight from the sender's mapped buffer.
    pub receives_mapped: u64,
    /// Sends and receives whose bytes went through host memory instead (a buffer that cannot
    /// be shared or mapped).
    pub by_host: u64,
    /// Collectives whose streams read the peers' buffers through mappings and reduced them
    /// on the GPU.
    pub collectives_mapped: u64,
    /// Collectives that ran through host memory instead, because some rank could not share or
    /// map a buffer it needed.
    pub collectives_by_host: u64,
}

/// A world whose operations run on device buffers, ordered on one CUDA stream.
pub struct DeviceWorld {
    backend: DeviceBackend,
    stream: Arc<CudaStream>,
}

impl DeviceWorld {
    /// Binds `world` to `stream` (of the device whose buffers the calls will pass). On a world
    /// whose backend is NCCL ([`crate::BackendChoice::Nccl`]) this creates the NCCL
    /// communicator: a collective call, as `ncclCommInitRank` is, bounded by the world's
    /// formation deadline.
    pub fn new(world: World, stream: Arc<CudaStream>) -> Result<DeviceWorld> {
        let ctx = stream.context().clone();
        let backend = DeviceBackend::start(world, RawContext(ctx.cu_ctx()), Some(ctx))?;
        Ok(DeviceWorld { backend, stream })
    }

    /// The world.
    pub fn world(&self) -> &World {
        self.backend.world()
    }

    /// The stream the operations are ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// How this world's sends and receives went through CUDA IPC so far (`MW_DEVICE_IPC=1`,
    /// peers on this host; `docs/cuda.md`).
    pub fn ipc_stats(&self) -> IpcStats {
        let [receives_mapped, by_host, collectives_mapped, collectives_by_host] = self.backend.ipc_counts();
        IpcStats { receives_mapped, by_host, collectives_mapped, collectives_by_host }
    }

    /// The first error of an operation that already ran, if any (operations report their
    /// failures asynchronously, like NCCL's `ncclCommGetAsyncError`).
    pub fn error(&self) -> Option<Error> {
        self.backend.error()
    }

    /// Enqueues operations as one batch on the stream.
    fn enqueue(&self, ops: &[DeviceOp]) -> Result<()> {
        // SAFETY: the stream is of the staging's context; the addresses come from cudarc
        // buffers whose guards the callers hold until this returns, and the buffers outlive
        // the stream's use of them (cudarc's contract for enqueued work, as with NCCL).
        unsafe { self.backend.enqueue(self.stream.cu_stream(), ops) }
    }

    fn one(&self, desc: OpDesc, send: Option<(CUdeviceptr, usize)>, recv: Option<(CUdeviceptr, usize)>) -> Result<()> {
        self.enqueue(&[(desc, send, recv)])
    }

    /// Starts a group: sends and receives recorded on it are enqueued together by
    /// [`DeviceGroup::end`] and run at once, so that an exchange between two ranks cannot
    /// deadlock (`ncclGroupStart`/`ncclGroupEnd` around sends and receives).
    pub fn group(&self) -> DeviceGroup<'_> {
        DeviceGroup { dw: self, ops: Vec::new(), _guards: Vec::new() }
    }

    /// A buffer's address and size in bytes, and cudarc's guard, which must live until the
    /// operation is enqueued (it orders the stream after other streams' writes of the buffer).
    fn ptr<'a, T, S: DevicePtr<T>>(&'a self, s: &'a S) -> ((CUdeviceptr, usize), SyncOnDrop<'a>) {
        let n = s.len() * std::mem::size_of::<T>();
        let (p, guard) = s.device_ptr(&self.stream);
        ((p, n), guard)
    }

    /// [`DeviceWorld::ptr`] for a buffer the operation writes.
    fn ptr_mut<'a, T, R: DevicePtrMut<T>>(&'a self, r: &'a mut R) -> ((CUdeviceptr, usize), SyncOnDrop<'a>) {
        let n = r.len() * std::mem::size_of::<T>();
        let (p, guard) = r.device_ptr_mut(&self.stream);
        ((p, n), guard)
    }

    fn desc(kind: OpKind, dtype: DataType, redop: ReduceOp, count: usize, root: usize, in_place: bool) -> OpDesc {
        OpDesc { kind, dtype, redop, count, root, is_send: false, in_place }
    }

    fn check_rank(&self, r: usize, what: &str) -> Result<()> {
        let n = self.world().size();
        if r >= n {
            return Err(Error::invalid_arg(format!(
                "world '{}': {what} rank {r} is out of range for {n} ranks",
                self.world().name()
            )));
        }
        Ok(())
    }

    fn check_len(&self, op: &str, got: usize, want: usize) -> Result<()> {
        if got != want {
            return Err(Error::invalid_arg(format!(
                "world '{}': {op} needs a buffer of {want} elements, got {got}",
                self.world().name()
            )));
        }
        Ok(())
    }

    /// Sends `data` to `peer` (cudarc's `Comm::send`). Point-to-point operations on one stream
    /// run in enqueue order: order the two sides of an exchange so that they meet.
    pub fn send<T: Element, S: DevicePtr<T>>(&self, data: &S, peer: usize) -> Result<()> {
        self.check_rank(peer, "peer")?;
        let d =
            OpDesc { is_send: true, ..Self::desc(OpKind::P2p, T::DATA_TYPE, ReduceOp::Sum, data.len(), peer, false) };
        let (s, _g) = self.ptr(data);
        self.one(d, Some(s), None)
    }

    /// Receives into `buf` from `peer` (cudarc's `Comm::recv`).
    pub fn recv<T: Element, R: DevicePtrMut<T>>(&self, buf: &mut R, peer: usize) -> Result<()> {
        self.check_rank(peer, "peer")?;
        let d = Self::desc(OpKind::P2p, T::DATA_TYPE, ReduceOp::Sum, buf.len(), peer, false);
        let (r, _g) = self.ptr_mut(buf);
        self.one(d, None, Some(r))
    }

    /// All-reduce of `send` into `recv` (cudarc's `Comm::all_reduce`).
    pub fn all_reduce<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
        op: &ReduceOp,
    ) -> Result<()> {
        self.check_len("all_reduce", recv.len(), send.len())?;
        let d = Self::desc(OpKind::AllReduce, T::DATA_TYPE, *op, send.len(), 0, false);
        let ((s, _gs), (r, _gr)) = (self.ptr(send), self.ptr_mut(recv));
        self.one(d, Some(s), Some(r))
    }

    /// All-reduce in place (cudarc's `Comm::all_reduce_in_place`).
    pub fn all_reduce_in_place<T: Element, R: DevicePtrMut<T>>(&self, buf: &mut R, op: &ReduceOp) -> Result<()> {
        let d = Self::desc(OpKind::AllReduce, T::DATA_TYPE, *op, buf.len(), 0, true);
        let (r, _g) = self.ptr_mut(buf);
        self.one(d, None, Some(r))
    }

    /// Broadcast from `root` (cudarc's `Comm::broadcast`; `send` only on the root).
    pub fn broadcast<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: Option<&S>,
        recv: &mut R,
        root: usize,
    ) -> Result<()> {
        self.check_rank(root, "root")?;
        let me = self.world().rank() == root;
        let send = match (send, me) {
            (Some(s), true) => {
                self.check_len("broadcast", s.len(), recv.len())?;
                Some(s)
            }
            (None, true) => return Err(Error::invalid_arg("broadcast: the root must pass a send buffer")),
            (_, false) => None,
        };
        let d = Self::desc(OpKind::Broadcast, T::DATA_TYPE, ReduceOp::Sum, recv.len(), root, false);
        let s = send.map(|s| self.ptr(s));
        let (r, _gr) = self.ptr_mut(recv);
        self.one(d, s.as_ref().map(|s| s.0), Some(r))
    }

    /// Broadcast in place (cudarc's `Comm::broadcast_in_place`).
    pub fn broadcast_in_place<T: Element, R: DevicePtrMut<T>>(&self, buf: &mut R, root: usize) -> Result<()> {
        self.check_rank(root, "root")?;
        let d = Self::desc(OpKind::Broadcast, T::DATA_TYPE, ReduceOp::Sum, buf.len(), root, true);
        let (r, _g) = self.ptr_mut(buf);
        self.one(d, None, Some(r))
    }

    /// Reduce to `root` (cudarc's `Comm::reduce`; `recv` is written on the root only).
    pub fn reduce<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
        op: &ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.check_rank(root, "root")?;
        let me = self.world().rank() == root;
        if me {
            self.check_len("reduce", recv.len(), send.len())?;
        }
        let d = Self::desc(OpKind::Reduce, T::DATA_TYPE, *op, send.len(), root, false);
        let (s, _gs) = self.ptr(send);
        let r = if me { Some(self.ptr_mut(recv)) } else { None };
        self.one(d, Some(s), r.as_ref().map(|r| r.0))
    }

    /// All-gather (cudarc's `Comm::all_gather`): `recv` holds `size` blocks of `send.len()`.
    pub fn all_gather<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(&self, send: &S, recv: &mut R) -> Result<()> {
        self.check_len("all_gather", recv.len(), send.len() * self.world().size())?;
        let d = Self::desc(OpKind::AllGather, T::DATA_TYPE, ReduceOp::Sum, send.len(), 0, false);
        let ((s, _gs), (r, _gr)) = (self.ptr(send), self.ptr_mut(recv));
        self.one(d, Some(s), Some(r))
    }

    /// Reduce-scatter (cudarc's `Comm::reduce_scatter`): `send` holds `size` blocks of
    /// `recv.len()`.
    pub fn reduce_scatter<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
        op: &ReduceOp,
    ) -> Result<()> {
        self.check_len("reduce_scatter", send.len(), recv.len() * self.world().size())?;
        let d = Self::desc(OpKind::ReduceScatter, T::DATA_TYPE, *op, recv.len(), 0, false);
        let ((s, _gs), (r, _gr)) = (self.ptr(send), self.ptr_mut(recv));
        self.one(d, Some(s), Some(r))
    }

    /// All-to-all: block `r` of `send` goes to rank `r`, block `r` of `recv` comes from rank
    /// `r`.
    pub fn all_to_all<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(&self, send: &S, recv: &mut R) -> Result<()> {
        self.check_len("all_to_all", recv.len(), send.len())?;
        let n = self.world().size();
        if send.len() % n != 0 {
            return Err(Error::invalid_arg("all_to_all: the buffer does not split into one block per rank"));
        }
        let d = Self::desc(OpKind::AllToAll, T::DATA_TYPE, ReduceOp::Sum, send.len() / n, 0, false);
        let ((s, _gs), (r, _gr)) = (self.ptr(send), self.ptr_mut(recv));
        self.one(d, Some(s), Some(r))
    }

    /// Waits (on the host) until everything enqueued so far on the stream has run, then reports
    /// the first failure among the operations, if any.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::new(ErrorKind::Cuda, format!("stream synchronize: {e:?}")))?;
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for DeviceWorld {
    fn drop(&mut self) {
        // The stager finishes what the stream still uses, then exits; NCCL finalizes.
        self.backend.close();
    }
}

/// Sends and receives of one [`DeviceWorld`], enqueued together by [`DeviceGroup::end`].
/// Dropping a group without `end` enqueues nothing.
pub struct DeviceGroup<'a> {
    dw: &'a DeviceWorld,
    ops: Vec<DeviceOp>,
    _guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> DeviceGroup<'a> {
    /// Records a send of `data` to `peer`.
    pub fn send<T: Element, S: DevicePtr<T>>(&mut self, data: &'a S, peer: usize) -> Result<()> {
        self.dw.check_rank(peer, "peer")?;
        let d = OpDesc {
            is_send: true,
            ..DeviceWorld::desc(OpKind::P2p, T::DATA_TYPE, ReduceOp::Sum, data.len(), peer, false)
        };
        let (s, g) = self.dw.ptr(data);
        self.ops.push((d, Some(s), None));
        self._guards.push(g);
        Ok(())
    }

    /// Records a receive into `buf` from `peer`.
    pub fn recv<T: Element, R: DevicePtrMut<T>>(&mut self, buf: &'a mut R, peer: usize) -> Result<()> {
        self.dw.check_rank(peer, "peer")?;
        let d = DeviceWorld::desc(OpKind::P2p, T::DATA_TYPE, ReduceOp::Sum, buf.len(), peer, false);
        let (r, g) = self.dw.ptr_mut(buf);
        self.ops.push((d, None, Some(r)));
        self._guards.push(g);
        Ok(())
    }

    /// Enqueues everything recorded, as one batch.
    pub fn end(self) -> Result<()> {
        self.dw.enqueue(&self.ops)
    }
}
