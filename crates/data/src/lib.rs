//! Face training data for facerec: labelled image sources and a deterministic multi-threaded batch loader.
//!
//! - [`input`]: the one image path (decode, fit to the model input by a [`Fit`] rule, normalise) that
//!   training sources, evaluation sets, `facerec eval` and `facerec cluster` share.
//! - [`Source`]: a labelled image collection that renders or decodes image `i` to RGB `u8` HWC.
//! - [`SyntheticFaces`]: the embedded default training set, procedurally generated identities.
//! - [`ImageFolder`]: one sub-folder per identity (PNG, PGM, JPEG), as in a custom insightface dataset
//!   before it is packed into RecordIO.
//! - [`RecordIo`]: insightface / MXNet `train.rec` + `train.idx` without MXNet; [`recordio`] holds the
//!   byte-level format, [`rec_writer`] packs an image folder, [`verification_pack`] writes
//!   insightface-style verification `.bin` files.
//! - [`Loader`]: shuffled (or identity-balanced P x K, [`Sampler`]), batched, optionally flipped epochs
//!   decoded by worker threads, bitwise reproducible whatever the thread count; [`load_all`] for
//!   evaluation sets; [`thread_split`] for sharing cores with libtorch.
//! - [`shared_data`]: finding, verifying and unpacking the real face archives in `../shared/data`.
//!
//! See `docs/data.md` for the synthetic face model, the RecordIO layouts and the loader's determinism
//! rules.

pub mod align;
pub mod augment;
pub mod image_folder;
pub mod input;
pub mod loader;
pub mod options;
pub mod rec;
pub mod rec_writer;
pub mod recordio;
pub mod sampler;
pub mod shared_data;
pub mod source;
pub mod synthetic;
pub mod threads;
pub mod verification_pack;

pub use augment::AugmentConfig;
pub use image_folder::{natural_cmp, ImageFolder};
pub use input::Fit;
pub use loader::{
    decode_parallel, load_all, thread_split, Batch, EpochIter, Loader, LoaderConfig, Shard,
    ThreadSplit,
};
pub use options::LoaderOptions;
pub use rec::{
    BadRecord, BadRecordPolicy, ClassOrigin, RecLayout, RecOptions, RecordIo, SizePolicy,
    DEFAULT_MAX_SKIPPED_FRACTION,
};
pub use rec_writer::{pack_image_folder, PackOptions, PackSummary};
pub use sampler::Sampler;
pub use source::Source;
pub use synthetic::{SyntheticConfig, SyntheticFaces};
pub use threads::cores;
