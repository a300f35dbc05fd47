//! Funnelhouse past one machine, on Apache Ballista: this crate owns the scheduler and
//! executor processes (`funnelhouse scheduler` / `funnelhouse executor`), Ballista's
//! codecs taught our tables (`events`, `funnel(...)`), plan nodes (the funnel's fold and
//! merge) and `window_funnel`, and the session that sends an engine's SQL and funnels to
//! a scheduler (`[query] ballista`). Every process reads the same Parquet files at the
//! same paths; the `events` table travels with the snapshot its client saw.

pub mod codec;
pub mod error;
pub mod process;

pub use codec::{LogicalCodec, PhysicalCodec};
pub use error::ClusterError;
pub use process::{ExecutorOptions, distribute, run_executor, run_scheduler};
