//! Funnelhouse past one machine, on Apache Ballista: this crate owns the scheduler and
//! executor processes (`funnelhouse scheduler` / `funnelhouse executor`), Ballista's
//! codecs taught our tables (`events`, `funnel(...)`), plan nodes (the funnel's fold and
//! merge) and `window_funnel`, and the session that sends an engine's SQL and funnels to
//! a scheduler (`[query] ballista`), whose jobs are cancelled when their queries end
//! early. The `events` table travels with the snapshot its client saw (with `[storage]`
//! every file by its object key, else by its path).

pub mod cancel;
pub mod codec;
pub mod error;
pub mod process;

pub use codec::{LogicalCodec, PhysicalCodec};
pub use error::ClusterError;
pub use process::{ExecutorOptions, distribute, run_executor, run_scheduler};
