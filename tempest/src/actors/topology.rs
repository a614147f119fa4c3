//! The topology actor: the run's lifecycle.
//!
//! On the first [`Stop`] it stops the source's polling, lets the pipeline
//! drain (everything in flight finishes, up to `graceful_shutdown`; with no
//! limit when the source ran dry), has the source flush its last acks and
//! shut down, and then reports why the run ended. A later, more urgent stop
//! (a signal while draining an exhausted source) shortens the drain.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::pipeline::{Drain, PipelineActor};
use super::source::{ShutdownSource, SourceActor, StopPolling};
use super::{Stop, StopReason};

pub(crate) struct TopologyActor {
    pipeline: Addr<PipelineActor>,
    source: Addr<SourceActor>,
    graceful: Duration,
    reason: Option<StopReason>,
    done: Option<oneshot::Sender<StopReason>>,
}

impl TopologyActor {
    pub fn new(
        pipeline: Addr<PipelineActor>,
        source: Addr<SourceActor>,
        graceful: Duration,
        done: oneshot::Sender<StopReason>,
    ) -> Self {
        TopologyActor {
            pipeline,
            source,
            graceful,
            reason: None,
            done: Some(done),
        }
    }
}

impl Actor for TopologyActor {
    type Context = Context<Self>;
}

impl Handler<Stop> for TopologyActor {
    type Result = ();

    fn handle(&mut self, Stop(reason): Stop, ctx: &mut Context<Self>) {
        let deadline = match reason {
            StopReason::SourceExhausted => None,
            _ => Some(Instant::now() + self.graceful),
        };
        if self.reason.is_some() {
            if deadline.is_some() {
                log::info!("Stopping sooner: {reason}.");
                self.pipeline.do_send(Drain { deadline });
            }
            return;
        }
        log::info!("Topology stopping: {reason}.");
        self.reason = Some(reason);
        let pipeline = self.pipeline.clone();
        let source = self.source.clone();
        ctx.spawn(
            async move {
                // The source has sent its last batch before it answers, so
                // the drain below reaches the pipeline after that batch.
                if source.send(StopPolling).await.is_err() {
                    log::error!("The source actor stopped before it stopped polling.");
                }
                if pipeline.send(Drain { deadline }).await.is_err() {
                    log::error!("The pipeline actor stopped before the drain finished.");
                }
                if source.send(ShutdownSource).await.is_err() {
                    log::error!("The source actor stopped before its shutdown.");
                }
            }
            .into_actor(self)
            .map(|(), act, _ctx| {
                if let (Some(done), Some(reason)) = (act.done.take(), act.reason.clone()) {
                    let _ = done.send(reason);
                }
            }),
        );
    }
}
