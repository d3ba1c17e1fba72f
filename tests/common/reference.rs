//! Test inputs and independently computed expected results, shared by the engine's unit
//! tests and the multi-process tests.
//!
//! Inputs are small integers (in -3..=3, or 0..=6 for unsigned types), so that every sum and
//! product over up to five ranks is exact in every type, including f16 and bf16: a result
//! either matches exactly or is wrong. Expected values are computed here in `f64`/`i128` and
//! rounded or wrapped into the type once.

#![allow(dead_code)]

use super::{DataType, ReduceOp};
use half::{bf16, f16};

/// Input element `i` of block `block` (blocks of `count`) on `rank`.
pub fn value(d: DataType, rank: usize, block: usize, count: usize, i: usize) -> f64 {
    let h = (rank * 7919 + (block * count + i) * 104_729 + 13) % 7;
    if matches!(d, DataType::U8 | DataType::U32 | DataType::U64) {
        h as f64
    } else {
        h as f64 - 3.0
    }
}

/// Writes `v` as one element of type `d` (integers wrap).
pub fn put(d: DataType, v: f64, out: &mut [u8]) {
    let w = v as i128;
    match d {
        DataType::I8 => out.copy_from_slice(&(w as i8).to_le_bytes()),
        DataType::U8 => out.copy_from_slice(&(w as u8).to_le_bytes()),
        DataType::I32 => out.copy_from_slice(&(w as i32).to_le_bytes()),
        DataType::U32 => out.copy_from_slice(&(w as u32).to_le_bytes()),
        DataType::I64 => out.copy_from_slice(&(w as i64).to_le_bytes()),
        DataType::U64 => out.copy_from_slice(&(w as u64).to_le_bytes()),
        DataType::F16 => out.copy_from_slice(&f16::from_f64(v).to_le_bytes()),
        DataType::BF16 => out.copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
        DataType::F32 => out.copy_from_slice(&(v as f32).to_le_bytes()),
        DataType::F64 => out.copy_from_slice(&v.to_le_bytes()),
    }
}

/// Reads one element of an integer type as i128.
fn get_int(d: DataType, b: &[u8]) -> i128 {
    match d {
        DataType::I8 => i8::from_le_bytes([b[0]]) as i128,
        DataType::U8 => b[0] as i128,
        DataType::I32 => i32::from_le_bytes(b[..4].try_into().unwrap()) as i128,
        DataType::U32 => u32::from_le_bytes(b[..4].try_into().unwrap()) as i128,
        DataType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap()) as i128,
        _ => u64::from_le_bytes(b[..8].try_into().unwrap()) as i128,
    }
}

/// Block `block` of `rank`'s input, `count` elements.
pub fn input(d: DataType, rank: usize, block: usize, count: usize) -> Vec<u8> {
    let e = d.size();
    let mut out = vec![0u8; count * e];
    for i in 0..count {
        put(d, value(d, rank, block, count, i), &mut out[i * e..(i + 1) * e]);
    }
    out
}

/// The reduction with `op` over ranks `0..n` of block `block`, `count` elements.
pub fn reduced(d: DataType, op: ReduceOp, n: usize, block: usize, count: usize) -> Vec<u8> {
    let e = d.size();
    let mut out = vec![0u8; count * e];
    for i in 0..count {
        let vals = (0..n).map(|r| value(d, r, block, count, i));
        let acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => vals.sum::<f64>(),
            ReduceOp::Prod => vals.product::<f64>(),
            ReduceOp::Max => vals.fold(f64::MIN, f64::max),
            ReduceOp::Min => vals.fold(f64::MAX, f64::min),
        };
        let o = &mut out[i * e..(i + 1) * e];
        if op != ReduceOp::Avg {
            put(d, acc, o);
        } else if !d.is_float() {
            // The sum wraps into the type first, then divides, truncating.
            put(d, acc, o);
            let wrapped = get_int(d, o);
            put(d, (wrapped / n as i128) as f64, o);
        } else {
            match d {
                DataType::F64 => put(d, acc / n as f64, o),
                DataType::F32 => o.copy_from_slice(&((acc as f32) / n as f32).to_le_bytes()),
                DataType::F16 => o.copy_from_slice(&f16::from_f32(acc as f32 / n as f32).to_le_bytes()),
                _ => o.copy_from_slice(&bf16::from_f32(acc as f32 / n as f32).to_le_bytes()),
            }
        }
    }
    out
}

/// Concatenation of block `block` of every rank's input (what all_gather produces for
/// `block = 0`, and what all_to_all delivers to rank `block`).
pub fn gathered(d: DataType, n: usize, block: usize, count: usize) -> Vec<u8> {
    (0..n).flat_map(|r| input(d, r, block, count)).collect()
}

/// All blocks `0..n` of `rank`'s input, concatenated.
pub fn blocks(d: DataType, rank: usize, n: usize, count: usize) -> Vec<u8> {
    (0..n).flat_map(|b| input(d, rank, b, count)).collect()
}
