//! Enrichment: click events as JSON lines are parsed into a typed `Click`,
//! looked up in an HTTP profile service by an async task while a sync task
//! scores them, joined into one `Enriched` record per click, and counted
//! per country.
//!
//! ```text
//!                  ┌─► profile (async HTTP) ─┐
//! JSON ──► parse ──┤                         ├─► enrich (join) ──► count
//!                  └─► score ────────────────┘
//! ```
//!
//! Every task is typed: the source's payloads are JSON, the edges between
//! tasks postcard. `parse` keys each click by its user, and the key travels
//! with the click's derived messages through every hop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tempest::codec::Codec;
use tempest::{
    AsyncTask, JoinTask, Joined, Msg, MsgCtx, Output, Pipeline, TaskContext, TaskError, TaskResult,
    TopologyBuilder, Typed, TypedOut, TypedResult, TypedTask,
};
use tempest_source_mock::{MockConfig, MockSource};

/// One click, as the source delivers it (a JSON line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Click {
    /// Who clicked.
    pub user: String,
    /// Where.
    pub page: String,
}

/// What the profile service knows of a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The user.
    pub user: String,
    /// Their country.
    pub country: String,
    /// Their tier.
    pub tier: String,
}

/// A click's score.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Score {
    /// The user.
    pub user: String,
    /// Points for the click.
    pub points: u32,
}

/// A click with its profile and score: what `enrich` joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enriched {
    /// The user.
    pub user: String,
    /// Their country.
    pub country: String,
    /// Their tier.
    pub tier: String,
    /// The click's points.
    pub points: u32,
}

/// The users the mock source's clicks come from.
pub const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];
/// The pages they click.
pub const PAGES: [&str; 4] = ["/", "/pricing", "/docs", "/blog/tempest"];

/// The source's JSON lines, cycled by the mock source (message `i` is line
/// `i % len`).
pub fn lines() -> Vec<String> {
    let mut out = Vec::new();
    for (i, user) in USERS.iter().enumerate() {
        let page = PAGES[i % PAGES.len()];
        out.push(format!(r#"{{"user":"{user}","page":"{page}"}}"#));
    }
    out
}

/// `parse`: a JSON line into a `Click`, keyed by its user.
#[derive(Clone, Debug)]
pub struct Parse;

impl TypedTask for Parse {
    type In = Click;
    type Out = Click;

    fn name(&self) -> &str {
        "parse"
    }

    fn handle(&mut self, click: Click, _ctx: &MsgCtx) -> TypedResult<Click> {
        if click.user.is_empty() {
            return Err(TaskError::msg("a click without a user"));
        }
        let user = click.user.clone();
        Ok(TypedOut::new(click).key(user).into())
    }
}

/// `profile`: looks the click's user up in the profile service, many
/// requests in flight per worker.
#[derive(Clone, Debug)]
pub struct ProfileLookup {
    base: String,
    client: Option<reqwest::Client>,
    worker: Option<TaskContext>,
}

impl ProfileLookup {
    /// A lookup against the service at `base` (`http://host:port`).
    pub fn new(base: impl Into<String>) -> Self {
        ProfileLookup {
            base: base.into(),
            client: None,
            worker: None,
        }
    }
}

impl AsyncTask for ProfileLookup {
    fn name(&self) -> &str {
        "profile"
    }

    fn started(&mut self, ctx: &TaskContext) {
        self.client = Some(
            reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                // The example's service answers one request per connection
                // (see `profiles`); against a real service, pool them.
                .pool_max_idle_per_host(0)
                .build()
                .unwrap_or_default(),
        );
        self.worker = Some(ctx.clone());
    }

    async fn handle(&self, msg: Msg, ctx: MsgCtx) -> TaskResult {
        let (Some(client), Some(worker)) = (&self.client, &self.worker) else {
            return Err(TaskError::msg("profile: not started"));
        };
        let click: Click = worker.decode(&msg, &ctx)?;
        let url = format!("{}/users/{}", self.base, click.user);
        let response = client.get(&url).send().await?.error_for_status()?;
        let body = response.bytes().await?;
        let profile: Profile = serde_json::from_slice(&body)?;
        Ok(Output::one(worker.encode(&profile)?))
    }
}

/// `score`: points for a click, by its page.
#[derive(Clone, Debug)]
pub struct Scorer;

/// The points a click on `page` scores.
pub fn points(page: &str) -> u32 {
    page.len() as u32
}

impl TypedTask for Scorer {
    type In = Click;
    type Out = Score;

    fn name(&self) -> &str {
        "score"
    }

    fn handle(&mut self, click: Click, _ctx: &MsgCtx) -> TypedResult<Score> {
        Ok(Score {
            points: points(&click.page),
            user: click.user,
        }
        .into())
    }
}

/// `enrich`: joins a click's profile and score.
#[derive(Clone, Debug, Default)]
pub struct Enrich {
    worker: Option<TaskContext>,
}

impl JoinTask for Enrich {
    fn name(&self) -> &str {
        "enrich"
    }

    fn started(&mut self, ctx: &TaskContext) {
        self.worker = Some(ctx.clone());
    }

    fn handle(&mut self, joined: Joined, _ctx: &MsgCtx) -> TaskResult {
        let (Some(profile), Some(score)) =
            (joined.from("profile").first(), joined.from("score").first())
        else {
            return Err(TaskError::msg("a click without its profile or its score"));
        };
        let profile: Profile = profile.decode()?;
        let score: Score = score.decode()?;
        let enriched = Enriched {
            user: profile.user,
            country: profile.country,
            tier: profile.tier,
            points: score.points,
        };
        let worker = self
            .worker
            .as_ref()
            .ok_or_else(|| TaskError::msg("enrich: not started"))?;
        Ok(Output::one(worker.encode(&enriched)?))
    }
}

/// Clicks and points per country, as `count` sees them.
#[derive(Debug, Default)]
pub struct Counts(Mutex<BTreeMap<String, (u64, u64)>>);

impl Counts {
    /// A copy of the counts: country → (clicks, points).
    pub fn snapshot(&self) -> BTreeMap<String, (u64, u64)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// `count`: clicks and points per country; prints them when it stops.
#[derive(Clone, Debug)]
pub struct Count(pub Arc<Counts>);

impl TypedTask for Count {
    type In = Enriched;
    type Out = ();

    fn name(&self) -> &str {
        "count"
    }

    fn handle(&mut self, e: Enriched, _ctx: &MsgCtx) -> TypedResult<()> {
        let mut counts = self.0 .0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = counts.entry(e.country).or_default();
        entry.0 += 1;
        entry.1 += u64::from(e.points);
        Ok(Typed::None)
    }

    fn shutdown(&mut self) {
        let line: Vec<String> = self
            .0
            .snapshot()
            .iter()
            .map(|(country, (clicks, points))| format!("{country}={clicks}/{points}"))
            .collect();
        println!("count: {}", line.join(" "));
    }
}

/// The pipeline, looking profiles up at `profiles` (`http://host:port`).
pub fn pipeline(profiles: &str, counts: &Arc<Counts>) -> Pipeline {
    Pipeline::new()
        .typed(Parse)
        .async_task(ProfileLookup::new(profiles))
        .typed(Scorer)
        .join(Enrich::default())
        .typed(Count(Arc::clone(counts)))
        .edge("parse", "profile")
        .edge("parse", "score")
        .edge("profile", "enrich")
        .edge("score", "enrich")
        .edge("enrich", "count")
        .source_codec(Codec::Json)
        .codec(Codec::Postcard)
        .concurrency("profile", 128)
}

/// The topology over `count` clicks from the mock source.
pub fn topology(count: u64, profiles: &str, counts: &Arc<Counts>) -> TopologyBuilder {
    let config = MockConfig {
        payloads: lines(),
        ..MockConfig::generator(count, 0)
    };
    TopologyBuilder::new("enrich")
        .source_config::<MockSource>(config)
        .msg_timeout(Duration::from_secs(30))
        .pipeline(pipeline(profiles, counts))
}

/// What `count` ends with after `count` clicks: country → (clicks,
/// points).
pub fn expected(count: u64) -> BTreeMap<String, (u64, u64)> {
    let lines = lines();
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for i in 0..count {
        let i = (i % lines.len() as u64) as usize;
        let page = PAGES[i % PAGES.len()];
        let e = out
            .entry(crate::profiles::country_of(USERS[i]).to_string())
            .or_default();
        e.0 += 1;
        e.1 += u64::from(points(page));
    }
    out
}
