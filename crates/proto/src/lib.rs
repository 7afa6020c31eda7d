//! The zapflow contract: generated from `proto/zapflow/v1`.

pub mod json;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("zapflow.v1");
}

/// Every file descriptor of the contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
