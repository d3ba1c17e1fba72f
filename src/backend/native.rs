//! The native backend: the engine (collective plans over links) behind a driver.

use super::Backend;
use crate::api::error::BrokenCause;
use crate::coll::OpDesc;
use crate::driver::Driver;
use crate::engine::{Direct, Posted, WorldStats};
use crate::sys::buf::RawBuf;
use crate::transport::TransportKind;

impl Backend for Driver {
    fn post(&self, ops: Vec<Posted>, driven: bool) {
        Driver::post(self, ops, driven)
    }

    fn post_one(&self, op: Posted, driven: bool) {
        Driver::post(self, std::iter::once(op), driven)
    }

    fn run_direct(&self, desc: &OpDesc, send: RawBuf, recv: RawBuf) -> Direct {
        Driver::run_direct(self, desc, send, recv)
    }

    fn abort(&self) {
        Driver::abort(self)
    }

    fn break_with(&self, cause: BrokenCause) {
        Driver::break_with(self, cause)
    }

    fn close(&self) {
        Driver::close(self)
    }

    fn broken(&self) -> Option<BrokenCause> {
        Driver::broken(self)
    }

    fn stats(&self) -> WorldStats {
        Driver::stats(self)
    }

    fn transports(&self) -> Vec<Option<TransportKind>> {
        Driver::transports(self)
    }

    fn lane_sources(&self, broken: bool) -> Vec<Option<crate::transport::PairSource>> {
        Driver::lane_sources(self, broken)
    }
}
