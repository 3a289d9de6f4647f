//! Face verification evaluation: insightface's 10-fold "Accuracy-Flip" protocol with VAL@FAR (SPEC 6.1),
//! ROC / TAR@FAR / AUC / EER for large pair sets, the IJB-B/C 1:1 template protocol (SPEC 6.2), the
//! flip-test embedding of images through any model closure, and the data formats: insightface `.bin`
//! packs (a pickle reader, no Python), LFW `pairs.txt`, IJB metadata, and balanced pair lists over
//! labelled items.
//!
//! Layout: `verification` and `roc` work on embeddings, distances or scores only; `embed`, `images` and
//! `ijb` hold the tch code; `pickle`, `bin_pack`, `lfw` and `pairs` produce [`Pair`] lists; `report` and
//! `plot` write what a run measured. The exact procedures and their differences from insightface are
//! written down in `docs/evaluation.md`.

pub mod bin_pack;
pub mod embed;
pub mod identification;
pub mod ijb;
pub mod ijb_1n;
pub mod images;
pub mod lfw;
pub mod pairs;
pub mod pickle;
pub mod plot;
pub mod report;
pub mod roc;
pub mod verification;

pub use bin_pack::BinPack;
pub use embed::{embed_with_flip, l2_normalize, pair_distances, verify_images};
pub use identification::{identify, IdentificationReport, CMC_RANKS, FPIR_TARGETS};
pub use images::Fit;
pub use lfw::{LfwPairs, LfwSet};
pub use pairs::{balanced_pairs, Pair, PairSet, PROTOCOL_FOLDS};
pub use roc::{Roc, RocReport, TarAtFar, FAR_TARGETS};
pub use verification::{
    squared_distances, val_at_far, verify, verify_distances, ValFar, VerificationReport,
};
