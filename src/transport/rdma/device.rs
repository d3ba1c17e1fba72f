//! The provider for an RDMA device, through libibverbs: one reliably connected queue pair per
//! link, on port 1 of the first device whose port 1 is active (or of the device
//! `MW_RDMA_DEVICE` names), its send and receive completions on one completion queue with a
//! completion channel, whose descriptor the link sleeps on.
//!
//! The bindings are `ibverbs-sys`, the `ibverbs` project's own (it builds rdma-core): the
//! released `ibverbs` crate's safe API has no RDMA write with immediate, no registration of
//! memory it did not allocate and no completion channel, all of which the transport needs.
//! Verbs that libibverbs defines inline (posting, polling, arming) go through the context's
//! operation table, as the inline functions do.
//!
//! Compiled and linted in CI; never run on a NIC here (no machine has one): `docs/rdma.md`.

use std::ffi::{c_int, c_void, CStr};
use std::os::fd::RawFd;
use std::ptr;

use ibverbs_sys as ffi;

use super::verbs::{Access, Completion, Op, QpState, QueuePair, Region, Remote, Status, VerbsError};

const PORT: u8 = 1;
/// Completion queue entries: a ring of writes, its credits and farewell, and the receives.
const CQ_ENTRIES: c_int = 256;
/// Work requests per queue.
const MAX_WR: u32 = 64;
/// Completions taken per `ibv_poll_cq`.
const POLL_BATCH: usize = 32;
/// Marks the work request ids of receives: the opcode of a completion in error is undefined, so
/// a flushed receive is told from a flushed write by its id.
const RECV_TAG: u64 = 1 << 63;
/// Marks the work request ids of reads, for the same reason.
const READ_TAG: u64 = 1 << 61;

fn os_err(what: &str) -> VerbsError {
    VerbsError(format!("ibverbs: {what}: {}", std::io::Error::last_os_error()))
}

fn errno_err(what: &str, errno: c_int) -> VerbsError {
    VerbsError(format!("ibverbs: {what}: {}", std::io::Error::from_raw_os_error(errno)))
}

/// An open device whose port 1 is active: its context, name and port attributes.
struct Opened {
    ctx: *mut ffi::ibv_context,
    name: String,
    port: ffi::ibv_port_attr,
}

/// Opens the device to use: `MW_RDMA_DEVICE`'s, else the first with port 1 active. The caller
/// closes it (`ibv_close_device`).
fn open_device() -> Result<Opened, VerbsError> {
    let mut n: c_int = 0;
    // SAFETY: an out-pointer to a local; the list is freed below.
    let list = unsafe { ffi::ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(os_err("listing RDMA devices"));
    }
    let wanted = std::env::var("MW_RDMA_DEVICE").ok();
    let mut seen = Vec::new();
    let mut found = None;
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds `n` device pointers.
        let dev = unsafe { *list.add(i) };
        // SAFETY: a device of the list; the name is a NUL-terminated string it owns.
        let name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(dev)) }.to_string_lossy().into_owned();
        if wanted.as_ref().is_some_and(|w| *w != name) {
            continue;
        }
        // SAFETY: a device of the list, open until closed.
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        if ctx.is_null() {
            seen.push(format!("{name} (cannot open)"));
            continue;
        }
        let mut port = ffi::ibv_port_attr::default();
        // SAFETY: an open context; libibverbs's exported `ibv_query_port` fills the leading
        // (compatible) part of the attributes.
        let r = unsafe { ffi::ibv_query_port(ctx, PORT, &mut port as *mut ffi::ibv_port_attr as *mut _) };
        if r == 0 && port.state == ffi::ibv_port_state::IBV_PORT_ACTIVE {
            found = Some(Opened { ctx, name, port });
            break;
        }
        seen.push(format!("{name} ({})", if r == 0 { "port 1 not active" } else { "port 1 cannot be queried" }));
        // SAFETY: opened above, not used again.
        unsafe { ffi::ibv_close_device(ctx) };
    }
    // SAFETY: the list from `ibv_get_device_list`, freed once; opened contexts stay valid.
    unsafe { ffi::ibv_free_device_list(list) };
    found.ok_or_else(|| {
        VerbsError(match (wanted, seen.is_empty()) {
            (Some(w), true) => format!("no RDMA device named {w} (MW_RDMA_DEVICE)"),
            (_, true) => "no RDMA device on this machine".into(),
            (_, false) => format!("no usable RDMA device: {}", seen.join(", ")),
        })
    })
}

/// The GID index of this process's RoCE links (`MW_RDMA_GID_INDEX`, default 0).
fn gid_index() -> c_int {
    std::env::var("MW_RDMA_GID_INDEX").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Whether a device is usable here, and if not, why.
pub(crate) fn available() -> Result<(), VerbsError> {
    let d = open_device()?;
    // SAFETY: opened by `open_device`, not used again.
    unsafe { ffi::ibv_close_device(d.ctx) };
    Ok(())
}

/// A queue pair on a device, and everything it was made of.
pub(crate) struct DeviceQp {
    name: String,
    port: ffi::ibv_port_attr,
    ctx: *mut ffi::ibv_context,
    channel: *mut ffi::ibv_comp_channel,
    cq: *mut ffi::ibv_cq,
    pd: *mut ffi::ibv_pd,
    qp: *mut ffi::ibv_qp,
    mrs: Vec<*mut ffi::ibv_mr>,
    /// This port's GID, where the link layer needs one (RoCE).
    gid: Option<[u8; 16]>,
    state: QpState,
    /// Completion events taken from the channel and not yet acknowledged.
    events: u32,
    /// Completions found by `arm`'s last look, handed out by the next `poll`.
    early: Vec<Completion>,
    /// Writes posted and not yet completed.
    outstanding: usize,
}

// SAFETY: the verbs objects may be used from any thread; the transport uses them from one at a
// time (the link's owner).
unsafe impl Send for DeviceQp {}

impl DeviceQp {
    pub(crate) fn new() -> Result<DeviceQp, VerbsError> {
        let d = open_device()?;
        let mut me = DeviceQp {
            name: d.name,
            port: d.port,
            ctx: d.ctx,
            channel: ptr::null_mut(),
            cq: ptr::null_mut(),
            pd: ptr::null_mut(),
            qp: ptr::null_mut(),
            mrs: Vec::new(),
            gid: None,
            state: QpState::Init,
            events: 0,
            early: Vec::new(),
            outstanding: 0,
        };
        // On failure `me` drops, freeing what was made.
        // SAFETY: each call gets the objects made before it, all live.
        unsafe {
            me.channel = ffi::ibv_create_comp_channel(me.ctx);
            if me.channel.is_null() {
                return Err(os_err("creating a completion channel"));
            }
            for (fd, what) in [((*me.channel).fd, "the completion channel"), ((*me.ctx).async_fd, "the event queue")] {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                    return Err(os_err(&format!("making {what} non-blocking")));
                }
            }
            me.cq = ffi::ibv_create_cq(me.ctx, CQ_ENTRIES, ptr::null_mut(), me.channel, 0);
            if me.cq.is_null() {
                return Err(os_err("creating a completion queue"));
            }
            me.pd = ffi::ibv_alloc_pd(me.ctx);
            if me.pd.is_null() {
                return Err(os_err("allocating a protection domain"));
            }
            let mut init = ffi::ibv_qp_init_attr {
                qp_context: ptr::null_mut(),
                send_cq: me.cq,
                recv_cq: me.cq,
                srq: ptr::null_mut(),
                cap: ffi::ibv_qp_cap {
                    max_send_wr: MAX_WR,
                    max_recv_wr: MAX_WR,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
                qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
                sq_sig_all: 0,
            };
            me.qp = ffi::ibv_create_qp(me.pd, &mut init);
            if me.qp.is_null() {
                return Err(os_err("creating a queue pair"));
            }
            // RoCE needs the port's GID in the address (which index: `MW_RDMA_GID_INDEX`, 0 by
            // default; RoCE v2 or routed fabrics often need another, as NCCL_IB_GID_INDEX does);
            // InfiniBand routes by LID.
            if me.port.link_layer == ffi::IBV_LINK_LAYER_ETHERNET as u8 {
                let mut gid = ffi::ibv_gid { raw: [0; 16] };
                if ffi::ibv_query_gid(me.ctx, PORT, gid_index(), &mut gid) != 0 {
                    return Err(os_err("querying the port's GID"));
                }
                me.gid = Some(gid.raw);
            }
            me.modify(
                ffi::ibv_qp_attr {
                    qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
                    pkey_index: 0,
                    port_num: PORT,
                    qp_access_flags: (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                        | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                        | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ)
                        .0,
                    ..Default::default()
                },
                ffi::ibv_qp_attr_mask::IBV_QP_STATE
                    | ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                    | ffi::ibv_qp_attr_mask::IBV_QP_PORT
                    | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS,
                "INIT",
            )?;
        }
        Ok(me)
    }

    fn modify(&mut self, mut attr: ffi::ibv_qp_attr, mask: ffi::ibv_qp_attr_mask, to: &str) -> Result<(), VerbsError> {
        // SAFETY: a live queue pair; the attributes live across the call.
        let r = unsafe { ffi::ibv_modify_qp(self.qp, &mut attr, mask.0 as c_int) };
        if r != 0 {
            return Err(errno_err(&format!("moving the queue pair to {to}"), r));
        }
        Ok(())
    }

    fn status(s: ffi::ibv_wc_status::Type, vendor: u32) -> Status {
        use ffi::ibv_wc_status::*;
        match s {
            IBV_WC_SUCCESS => Status::Success,
            IBV_WC_LOC_PROT_ERR => Status::LocalProtection,
            IBV_WC_REM_ACCESS_ERR => Status::RemoteAccess,
            IBV_WC_RNR_RETRY_EXC_ERR => Status::ReceiverNotReady,
            IBV_WC_RETRY_EXC_ERR => Status::RetryExceeded,
            IBV_WC_WR_FLUSH_ERR => Status::Flushed,
            // SAFETY: returns a static string for any status.
            other => Status::Other(format!(
                "{} (vendor error {vendor:#x})",
                unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(other)) }.to_string_lossy()
            )),
        }
    }

    /// Posts one signaled request of `op` (and its immediate) on the send queue: `len` bytes at
    /// `offset` in `local` (none for a write of only an immediate), to or from `remote`.
    fn post_send(
        &mut self,
        wr_id: u64,
        op: (ffi::ibv_wr_opcode::Type, Option<u32>),
        local: &Region,
        offset: usize,
        len: usize,
        remote: Remote,
    ) -> Result<(), VerbsError> {
        if self.state != QpState::Ready {
            return Err(VerbsError(format!("ibverbs: the queue pair is not ready ({:?})", self.state)));
        }
        if offset.checked_add(len).is_none_or(|e| e > local.len) {
            return Err(VerbsError("ibverbs: a request outside its region".into()));
        }
        let mut sge = ffi::ibv_sge { addr: local.addr + offset as u64, length: len as u32, lkey: local.lkey };
        // SAFETY: a plain C struct, all-zero is a valid value; the fields that matter are set.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = if len == 0 { ptr::null_mut() } else { &mut sge };
        wr.num_sge = c_int::from(len != 0);
        wr.opcode = op.0;
        wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        if let Some(imm) = op.1 {
            wr.__bindgen_anon_1.imm_data = imm.to_be();
        }
        wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr: remote.addr, rkey: remote.rkey };
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        let post = self.ops().post_send.ok_or_else(|| VerbsError("ibverbs: no post_send".into()))?;
        // SAFETY: a live queue pair; the request and its scatter entry live across the call
        // (the device copies them); the local range lies in a registration under `register`'s
        // contract, which the transport does not touch again before the request completes.
        let r = unsafe { post(self.qp, &mut wr, &mut bad) };
        if r != 0 {
            self.state = QpState::Error;
            return Err(errno_err("posting a request", r));
        }
        self.outstanding += 1;
        Ok(())
    }

    /// The context's operation table, where the inline verbs live.
    fn ops(&self) -> &ffi::ibv_context_ops {
        // SAFETY: a live context; its table lives as long as it does.
        unsafe { &(*self.ctx).ops }
    }
}

impl Drop for DeviceQp {
    fn drop(&mut self) {
        // SAFETY: each object was made by this queue pair and is destroyed once, after what
        // depends on it; the events taken are acknowledged before the queue goes.
        unsafe {
            if !self.qp.is_null() {
                ffi::ibv_destroy_qp(self.qp);
            }
            for mr in self.mrs.drain(..) {
                ffi::ibv_dereg_mr(mr);
            }
            if !self.pd.is_null() {
                ffi::ibv_dealloc_pd(self.pd);
            }
            if !self.cq.is_null() {
                if self.events > 0 {
                    ffi::ibv_ack_cq_events(self.cq, self.events);
                }
                ffi::ibv_destroy_cq(self.cq);
            }
            if !self.channel.is_null() {
                ffi::ibv_destroy_comp_channel(self.channel);
            }
            ffi::ibv_close_device(self.ctx);
        }
    }
}

impl QueuePair for DeviceQp {
    fn provider(&self) -> String {
        format!("ibverbs {} port {PORT}", self.name)
    }

    fn local_info(&self) -> Vec<u8> {
        // QP number, LID, MTU, then the GID where the port has one.
        // SAFETY: a live queue pair.
        let num = unsafe { (*self.qp).qp_num };
        let mut v = num.to_le_bytes().to_vec();
        v.extend_from_slice(&self.port.lid.to_le_bytes());
        v.extend_from_slice(&self.port.active_mtu.to_le_bytes());
        if let Some(gid) = self.gid {
            v.extend_from_slice(&gid);
        }
        v
    }

    fn connect(&mut self, remote: &[u8], _active: bool) -> Result<(), VerbsError> {
        if self.state != QpState::Init {
            return Err(VerbsError("ibverbs: the queue pair is already connected".into()));
        }
        if remote.len() != 10 && remote.len() != 26 {
            return Err(VerbsError(format!("ibverbs: peer connection data of {} bytes", remote.len())));
        }
        let num = u32::from_le_bytes([remote[0], remote[1], remote[2], remote[3]]);
        let lid = u16::from_le_bytes([remote[4], remote[5]]);
        let mtu = u32::from_le_bytes([remote[6], remote[7], remote[8], remote[9]]).min(self.port.active_mtu);
        let mut ah = ffi::ibv_ah_attr { dlid: lid, sl: 0, src_path_bits: 0, port_num: PORT, ..Default::default() };
        if let Some(gid) = remote.get(10..26) {
            ah.is_global = 1;
            // SAFETY: writing the raw bytes of a plain union.
            unsafe { ah.grh.dgid.raw.copy_from_slice(gid) };
            ah.grh.hop_limit = 0xff;
            ah.grh.sgid_index = gid_index() as u8;
        }
        use ffi::ibv_qp_attr_mask as M;
        self.modify(
            ffi::ibv_qp_attr {
                qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
                path_mtu: mtu,
                dest_qp_num: num,
                rq_psn: 0,
                max_dest_rd_atomic: 4,
                min_rnr_timer: 12,
                ah_attr: ah,
                ..Default::default()
            },
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;
        // Retries: 7 for the transport, about 1 s each (timeout 18: 4.096 us x 2^18), patient
        // under congestion; unbounded for a receiver not ready, which the link always is
        // shortly. The world's heartbeats and the TCP connection see a dead peer sooner.
        self.modify(
            ffi::ibv_qp_attr {
                qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
                sq_psn: 0,
                timeout: 18,
                retry_cnt: 7,
                rnr_retry: 7,
                max_rd_atomic: 4,
                ..Default::default()
            },
            M::IBV_QP_STATE
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )?;
        self.state = QpState::Ready;
        Ok(())
    }

    unsafe fn register(&mut self, addr: *mut u8, len: usize, access: Access) -> Result<Region, VerbsError> {
        let access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | match access {
                Access::Local => ffi::ibv_access_flags(0),
                Access::RemoteWrite => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE,
                Access::RemoteRead => ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ,
            };
        let access = access.0;
        // SAFETY: a live protection domain; the caller's promise covers the memory.
        let mr = unsafe { ffi::ibv_reg_mr(self.pd, addr as *mut c_void, len, access as c_int) };
        if mr.is_null() {
            return Err(os_err("registering memory"));
        }
        self.mrs.push(mr);
        // SAFETY: a registration just made.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        Ok(Region { addr: addr as usize as u64, len, lkey, rkey })
    }

    fn post_write_imm(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote: Remote,
        imm: u32,
    ) -> Result<(), VerbsError> {
        let op = (ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM, Some(imm));
        self.post_send(wr_id, op, local, offset, len, remote)
    }

    fn drained(&mut self) -> bool {
        self.outstanding == 0
    }

    fn deregister(&mut self, region: &Region) {
        // SAFETY: the registrations are this queue pair's; each is deregistered once.
        self.mrs.retain(|&mr| unsafe {
            if (*mr).lkey == region.lkey {
                ffi::ibv_dereg_mr(mr);
                false
            } else {
                true
            }
        });
    }

    fn post_read(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote: Remote,
    ) -> Result<(), VerbsError> {
        if len == 0 {
            return Err(VerbsError("ibverbs: a read of no bytes".into()));
        }
        self.post_send(wr_id | READ_TAG, (ffi::ibv_wr_opcode::IBV_WR_RDMA_READ, None), local, offset, len, remote)
    }

    fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError> {
        // SAFETY: a plain C struct, all-zero is a valid value.
        let mut wr: ffi::ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id | RECV_TAG;
        let mut bad: *mut ffi::ibv_recv_wr = ptr::null_mut();
        let post = self.ops().post_recv.ok_or_else(|| VerbsError("ibverbs: no post_recv".into()))?;
        // SAFETY: a live queue pair; a receive for a write with immediate carries no buffer.
        let r = unsafe { post(self.qp, &mut wr, &mut bad) };
        if r != 0 {
            return Err(errno_err("posting a receive", r));
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), VerbsError> {
        out.append(&mut self.early);
        // Events the channel reported are taken (acknowledged in batches, and on drop).
        let mut cq: *mut ffi::ibv_cq = ptr::null_mut();
        let mut ctx: *mut c_void = ptr::null_mut();
        // SAFETY: a live, non-blocking channel; out-pointers to locals.
        while unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } == 0 {
            self.events += 1;
        }
        if self.events >= 64 {
            // SAFETY: acknowledges events taken from this queue.
            unsafe { ffi::ibv_ack_cq_events(self.cq, self.events) };
            self.events = 0;
        }
        let poll = self.ops().poll_cq.ok_or_else(|| VerbsError("ibverbs: no poll_cq".into()))?;
        // SAFETY: `ibv_wc` is a plain C struct; all-zero is a valid value.
        let mut wc: [ffi::ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: a live completion queue; room for POLL_BATCH completions.
            let n = unsafe { poll(self.cq, POLL_BATCH as c_int, wc.as_mut_ptr()) };
            if n < 0 {
                self.state = QpState::Error;
                return Err(VerbsError(format!("ibverbs: polling the completion queue failed ({n})")));
            }
            for c in &wc[..n as usize] {
                let status = match c.error() {
                    None => Status::Success,
                    Some((s, vendor)) => DeviceQp::status(s, vendor),
                };
                if status != Status::Success {
                    self.state = QpState::Error;
                }
                let (op, wr_id) = if c.wr_id() & RECV_TAG != 0 {
                    (Op::RecvImm, c.wr_id() & !RECV_TAG)
                } else if c.wr_id() & READ_TAG != 0 {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    (Op::Read, c.wr_id() & !READ_TAG)
                } else {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    (Op::Write, c.wr_id())
                };
                out.push(Completion { wr_id, op, status, imm: u32::from_be(c.imm_data), len: c.len() as u32 });
            }
            if (n as usize) < POLL_BATCH {
                return Ok(());
            }
        }
    }

    fn state(&self) -> QpState {
        self.state
    }

    fn event(&mut self) -> Option<String> {
        // Each queue pair has a context of its own, so every event of it is this link's; each
        // is acknowledged at once (destroying a queue pair waits for its events' acks).
        let mut found = None;
        // SAFETY: `ibv_async_event` is a plain C struct; all-zero is a valid value.
        let mut ev: ffi::ibv_async_event = unsafe { std::mem::zeroed() };
        // SAFETY: a live context whose event descriptor is non-blocking; an out-pointer to a local.
        while unsafe { ffi::ibv_get_async_event(self.ctx, &mut ev) } == 0 {
            // SAFETY: the union's member is the one the event type names.
            let what = unsafe {
                match ev.event_type {
                    ffi::IBV_EVENT_QP_FATAL | ffi::IBV_EVENT_QP_REQ_ERR | ffi::IBV_EVENT_QP_ACCESS_ERR
                        if ev.element.qp == self.qp =>
                    {
                        Some(format!("the queue pair hit a fatal error (event {})", ev.event_type))
                    }
                    ffi::IBV_EVENT_CQ_ERR if ev.element.cq == self.cq => Some("the completion queue overran".into()),
                    ffi::IBV_EVENT_PORT_ERR if ev.element.port_num == c_int::from(PORT) => {
                        Some(format!("port {PORT} went down"))
                    }
                    ffi::IBV_EVENT_DEVICE_FATAL => Some("the device hit a fatal error".into()),
                    _ => None,
                }
            };
            // SAFETY: an event taken above, acknowledged once.
            unsafe { ffi::ibv_ack_async_event(&mut ev) };
            if let Some(w) = what {
                self.state = QpState::Error;
                found.get_or_insert(format!("ibverbs {}: {w}", self.name));
            }
        }
        found
    }

    fn event_fd(&self) -> Option<RawFd> {
        // SAFETY: a live context.
        Some(unsafe { (*self.ctx).async_fd })
    }

    fn arm(&mut self) -> Option<(RawFd, i16)> {
        // Armed first, then one more look: a completion that came before the arming raises no
        // event, so it is found here (and handed out by the next poll) instead of slept past.
        let notify = self.ops().req_notify_cq?;
        // SAFETY: a live completion queue.
        if unsafe { notify(self.cq, 0) } != 0 {
            return None;
        }
        let mut early = std::mem::take(&mut self.early);
        let looked = self.poll(&mut early);
        self.early = early;
        if looked.is_err() || !self.early.is_empty() {
            return None;
        }
        // SAFETY: a live channel.
        Some((unsafe { (*self.channel).fd }, libc::POLLIN))
    }
}
