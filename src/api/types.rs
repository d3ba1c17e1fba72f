//! Element types and reduction operations, in NCCL's set.

use std::fmt;

/// The element type of a buffer, numbered as NCCL's `ncclDataType_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DataType {
    /// `i8` (`ncclInt8`).
    I8 = 0,
    /// `u8` (`ncclUint8`).
    U8 = 1,
    /// `i32` (`ncclInt32`).
    I32 = 2,
    /// `u32` (`ncclUint32`).
    U32 = 3,
    /// `i64` (`ncclInt64`).
    I64 = 4,
    /// `u64` (`ncclUint64`).
    U64 = 5,
    /// IEEE half precision (`ncclFloat16`).
    F16 = 6,
    /// `f32` (`ncclFloat32`).
    F32 = 7,
    /// `f64` (`ncclFloat64`).
    F64 = 8,
    /// bfloat16 (`ncclBfloat16`).
    BF16 = 9,
}

impl DataType {
    /// Every data type, in NCCL's order.
    pub const ALL: [DataType; 10] = [
        DataType::I8,
        DataType::U8,
        DataType::I32,
        DataType::U32,
        DataType::I64,
        DataType::U64,
        DataType::F16,
        DataType::F32,
        DataType::F64,
        DataType::BF16,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DataType::I8 | DataType::U8 => 1,
            DataType::F16 | DataType::BF16 => 2,
            DataType::I32 | DataType::U32 | DataType::F32 => 4,
            DataType::I64 | DataType::U64 | DataType::F64 => 8,
        }
    }

    /// True for the floating-point types.
    pub const fn is_float(self) -> bool {
        matches!(self, DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64)
    }

    /// The type with NCCL's number `code`, if there is one.
    pub fn from_code(code: u32) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| *d as u32 == code)
    }

    /// Lower-case name, as nccl-tests prints it.
    pub const fn name(self) -> &'static str {
        match self {
            DataType::I8 => "int8",
            DataType::U8 => "uint8",
            DataType::I32 => "int32",
            DataType::U32 => "uint32",
            DataType::I64 => "int64",
            DataType::U64 => "uint64",
            DataType::F16 => "half",
            DataType::F32 => "float",
            DataType::F64 => "double",
            DataType::BF16 => "bfloat16",
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A reduction operation, numbered as NCCL's `ncclRedOp_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceOp {
    /// Sum (integers wrap).
    Sum = 0,
    /// Product (integers wrap).
    Prod = 1,
    /// Maximum.
    Max = 2,
    /// Minimum.
    Min = 3,
    /// Average: the sum divided by the number of ranks (integers: truncating division).
    Avg = 4,
}

impl ReduceOp {
    /// Every reduction, in NCCL's order.
    pub const ALL: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min, ReduceOp::Avg];

    /// The op with NCCL's number `code`, if there is one.
    pub fn from_code(code: u32) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|o| *o as u32 == code)
    }

    /// Lower-case name, as nccl-tests prints it.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Avg => "avg",
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A host element type that worlds can move and reduce.
///
/// Implemented for NCCL's ten types: `i8`, `u8`, `i32`, `u32`, `i64`, `u64`, [`half::f16`],
/// [`half::bf16`], `f32` and `f64`.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The matching [`DataType`].
    const DATA_TYPE: DataType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t { const DATA_TYPE: DataType = DataType::$d; })*
    };
}
element!(
    i8 => I8, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64,
    half::f16 => F16, f32 => F32, f64 => F64, half::bf16 => BF16,
);
