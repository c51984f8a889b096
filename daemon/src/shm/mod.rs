//! Client shared-memory segments: name validation, cached mappings, typed views,
//! and the sweep that removes segments left behind by dead clients.

pub mod mapping;
pub mod names;
pub mod peer;
pub mod pool;
pub mod sweep;
pub mod view;

pub use mapping::{Mapping, SegmentCache};
pub use pool::SegmentPool;
pub use view::{
    visit_csr, CsrRegions, CsrVisitor, DenseRegions, FloatSlice, FloatSliceMut, IndexSlice,
    MatrixRegions, Peer, Region, Resolver,
};
