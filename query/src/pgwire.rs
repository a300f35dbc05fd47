//! The Postgres wire protocol on `pg_addr`, so psql, psycopg, Grafana, Metabase and
//! DBeaver query the same `events` table (and `window_funnel`) as `POST /v1/sql`.
//!
//! datafusion-postgres does the protocol and the `pg_catalog` tables clients read;
//! this module adds what the contract asks on top: read-only (anything but queries,
//! EXPLAIN, SHOW, SET and transaction control is refused with SQLSTATE 25006), the
//! SETs clients send on connect accepted without touching the shared session, the
//! query limits (`timeout` over planning and every row streamed, `max_result_rows`: see
//! [`crate::limits`]), and password = a read token when read tokens are configured.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::{Response, Tag};
use datafusion_postgres::pgwire::api::{
    ClientInfo, PgWireConnectionState, PgWireServerHandlers, PidSecretKeyGenerator,
    RandomPidSecretKeyGenerator,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::startup::Authentication;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::pgwire::tokio::process_socket;
use datafusion_postgres::{DfSessionService, QueryHook};
use funnelhouse_schemas::auth::contains_secret;
use futures::{Sink, SinkExt};
use tokio::net::TcpListener;

use crate::error::{QueryError, Result};
use crate::session::QueryEngine;

/// The database name clients connect to (any other name works too).
pub const DATABASE: &str = "funnelhouse";

/// Client-side settings datafusion-postgres keeps per connection; any other SET would
/// reach the session every connection shares, so it is answered without effect.
/// (`statement_timeout` is not among them: `[query] timeout` holds for every client.)
const PER_CONNECTION_SETTINGS: &[&str] = &[
    "datestyle",
    "bytea_output",
    "intervalstyle",
    "application_name",
    "extra_float_digits",
    "search_path",
];

/// Serve the Postgres wire protocol on `listener` until the task is dropped.
pub async fn serve_pg(
    listener: TcpListener,
    engine: &QueryEngine,
    read_tokens: Vec<String>,
) -> Result<()> {
    let handlers = Arc::new(PgHandlers::new(engine, read_tokens)?);
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                let handlers = Arc::clone(&handlers);
                tokio::spawn(async move {
                    if let Err(e) = process_socket(socket, None, handlers).await {
                        tracing::debug!(%peer, error = %e, "postgres connection ended with an error");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "postgres accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

struct PgHandlers {
    session: Arc<DfSessionService>,
    startup: Arc<TokenStartup>,
}

impl PgHandlers {
    fn new(engine: &QueryEngine, read_tokens: Vec<String>) -> Result<Self> {
        // datafusion-postgres times planning only, and pgwire gathers an extended-protocol
        // result in memory before sending it: both limits are enforced in the plan.
        let limits = crate::limits::ResultLimits {
            timeout: engine.timeout(),
            max_rows: engine.max_result_rows(),
        };
        let ctx = crate::limits::with_limits(engine.context(), limits);
        setup_pg_catalog(&ctx, DATABASE, EmptyContextProvider)
            .map_err(|e| QueryError::Internal(format!("pg_catalog: {e}")))?;
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(ReadOnlyHook),
            Arc::new(CursorStatementHook),
            Arc::new(SetShowHook),
            Arc::new(TransactionStatementHook),
        ];
        Ok(Self {
            session: Arc::new(DfSessionService::new_with_hooks(Arc::new(ctx), hooks)),
            startup: Arc::new(TokenStartup {
                tokens: read_tokens,
                timeout_ms: engine.timeout().as_millis().to_string(),
                pids: RandomPidSecretKeyGenerator::default(),
                parameters: DefaultServerParameterProvider::default(),
            }),
        })
    }
}

impl PgWireServerHandlers for PgHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.session)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.session)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.startup)
    }
}

/// Without read tokens anyone connects; with them the password must be one (compared in
/// constant time), whatever the user name.
struct TokenStartup {
    tokens: Vec<String>,
    /// The `[query] timeout`, applied by datafusion-postgres to planning (execution has
    /// its `LimitsExec`).
    timeout_ms: String,
    pids: RandomPidSecretKeyGenerator,
    parameters: DefaultServerParameterProvider,
}

impl TokenStartup {
    async fn accept<C>(&self, client: &mut C) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (pid, key) = self.pids.generate(&*client);
        client.set_pid_and_secret_key(pid, key);
        finish_authentication(client, &self.parameters).await
    }
}

#[async_trait]
impl StartupHandler for TokenStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                client
                    .metadata_mut()
                    .insert("statement_timeout_ms".into(), self.timeout_ms.clone());
                if self.tokens.is_empty() {
                    self.accept(client).await?;
                } else {
                    client.set_state(PgWireConnectionState::AuthenticationInProgress);
                    client
                        .send(PgWireBackendMessage::Authentication(
                            Authentication::CleartextPassword,
                        ))
                        .await?;
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(password) => {
                let password = password.into_password()?;
                if contains_secret(&self.tokens, &password.password) {
                    self.accept(client).await?;
                } else {
                    let user = client.metadata().get("user").cloned().unwrap_or_default();
                    return Err(PgWireError::InvalidPassword(user));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Runs before the other hooks: refuses writes, absorbs session-wide SETs.
struct ReadOnlyHook;

enum Verdict {
    /// Let the other hooks and DataFusion handle it.
    Pass,
    /// A SET that would change the shared session: answer `SET`, do nothing.
    Absorb,
    Refuse(String),
}

fn verdict(statement: &Statement) -> Verdict {
    match statement {
        Statement::Query(_)
        | Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ExplainTable { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. } => Verdict::Pass,
        Statement::Explain { statement, .. } => match verdict(statement) {
            Verdict::Pass => Verdict::Pass,
            _ => refuse(statement),
        },
        Statement::Set(Set::SingleAssignment { variable, .. })
            if PER_CONNECTION_SETTINGS.contains(&variable.to_string().to_lowercase().as_str()) =>
        {
            Verdict::Pass
        }
        Statement::Set(Set::SetTimeZone { .. }) => Verdict::Pass,
        Statement::Set(_) => Verdict::Absorb,
        other => refuse(other),
    }
}

fn refuse(statement: &Statement) -> Verdict {
    let text = statement.to_string();
    let keyword: String = text
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Verdict::Refuse(format!(
        "Funnelhouse is read-only over the Postgres wire: {keyword} is not allowed (events come in through the HTTP collector)"
    ))
}

fn read_only_error(message: String) -> PgWireError {
    // 25006: read_only_sql_transaction, what Postgres answers on a read-only standby.
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        "25006".into(),
        message,
    )))
}

/// The verdict on the statement's syntax, then, for a query that passes, on its plan:
/// `SELECT ... INTO t` is a query by syntax but plans as CREATE TABLE, which the same
/// `SQLOptions` as `/v1/sql` refuse. A statement that does not plan here is left to
/// datafusion-postgres, which reports the planning error itself.
async fn verdict_with_plan(statement: &Statement, ctx: &SessionContext) -> Verdict {
    let verdict = verdict(statement);
    if !matches!(verdict, Verdict::Pass)
        || !matches!(statement, Statement::Query(_) | Statement::Explain { .. })
    {
        return verdict;
    }
    let parsed = datafusion::sql::parser::Statement::Statement(Box::new(statement.clone()));
    match ctx.state().statement_to_plan(parsed).await {
        Ok(plan) if QueryEngine::read_only_options().verify_plan(&plan).is_err() => {
            refuse(statement)
        }
        _ => Verdict::Pass,
    }
}

fn respond(verdict: Verdict) -> Option<PgWireResult<Response>> {
    match verdict {
        Verdict::Pass => None,
        Verdict::Absorb => Some(Ok(Response::Execution(Tag::new("SET")))),
        Verdict::Refuse(message) => Some(Err(read_only_error(message))),
    }
}

#[async_trait]
impl QueryHook for ReadOnlyHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        respond(verdict_with_plan(statement, ctx).await)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        // A refused statement fails at Parse; an absorbed SET is planned by SetShowHook
        // and answered at Execute below.
        match verdict_with_plan(statement, ctx).await {
            Verdict::Refuse(message) => Some(Err(read_only_error(message))),
            _ => None,
        }
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        // Refusals happened at Parse; only absorbed SETs are left to answer.
        respond(verdict(statement))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn kind(sql: &str) -> &'static str {
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        match verdict(&statement) {
            Verdict::Pass => "pass",
            Verdict::Absorb => "absorb",
            Verdict::Refuse(_) => "refuse",
        }
    }

    #[test]
    fn writes_are_refused_and_session_sets_absorbed() {
        assert_eq!(kind("SELECT count(*) FROM events"), "pass");
        assert_eq!(kind("EXPLAIN SELECT 1"), "pass");
        assert_eq!(kind("SET extra_float_digits = 3"), "pass");
        assert_eq!(kind("SET statement_timeout = 0"), "absorb");
        assert_eq!(kind("SET datafusion.execution.batch_size = 1"), "absorb");
        assert_eq!(kind("INSERT INTO events VALUES (1)"), "refuse");
        assert_eq!(kind("CREATE TABLE t (a int)"), "refuse");
        assert_eq!(kind("DROP TABLE events"), "refuse");
        assert_eq!(kind("COPY events TO '/tmp/x'"), "refuse");
        assert_eq!(kind("EXPLAIN ANALYZE DELETE FROM events"), "refuse");
    }
}
