//! The pipeline: a DAG of tasks, its validation and its export.
//!
//! [`Pipeline`] is the builder; [`Pipeline::build`] checks it and reports
//! every problem at once, or returns the compiled [`Dag`] in which tasks and
//! edges are small integers, so routing never touches a string.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::codec::{Codec, EdgeCodecs, TaskCodecs, TypeSig};
use crate::grouping::Grouping;
use crate::join::{JoinAdapter, JoinTask};
use crate::msg::intern;
use crate::task::{AsyncRunner, AsyncTask, Task, TaskBody, DEFAULT_CONCURRENCY};
use crate::typed::{TypedAdapter, TypedTask};

/// Makes a fresh instance of a task for each of its workers.
pub(crate) type TaskFactory = Arc<dyn Fn() -> TaskBody + Send + Sync>;

/// Makes a fresh instance of a join task for each of its workers, given
/// its parents' names in the compiled pipeline's parent order.
type JoinFactory = Arc<dyn Fn(&[(TaskIdx, &'static str)]) -> Box<dyn Task> + Send + Sync>;

pub use crate::msg::TaskIdx;

/// The most tasks a pipeline may have.
pub const MAX_TASKS: usize = u16::MAX as usize - 1;

/// A pipeline under construction: tasks, edges, and optionally the root.
///
/// ```
/// use tempest::{Msg, MsgCtx, Output, Pipeline, Task, TaskResult};
///
/// #[derive(Clone)]
/// struct Pass(&'static str);
/// impl Task for Pass {
///     fn name(&self) -> &str { self.0 }
///     fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult { Ok(Output::One(msg)) }
/// }
///
/// let dag = Pipeline::new()
///     .task(Pass("a"))
///     .task(Pass("b"))
///     .task(Pass("c"))
///     .edge("a", "b")
///     .edge("a", "c")
///     .build()
///     .unwrap();
/// assert_eq!(dag.root_name(), "a");
/// assert!(dag.to_dot("example").contains("\"a\" -> \"b\""));
/// ```
#[derive(Clone, Default)]
pub struct Pipeline {
    tasks: Vec<(String, TaskFactory)>,
    edges: Vec<(String, String)>,
    /// Groupings set on edges, in the order set (later wins).
    groupings: Vec<(String, String, Grouping)>,
    root: Option<String>,
    /// The join tasks (also in `tasks`, which fixes their index), whose
    /// factories need their parents, known at build.
    joins: Vec<(String, JoinFactory)>,
    /// The names of the tasks added as [`AsyncTask`]s.
    async_tasks: Vec<String>,
    /// Concurrency set per async task, in the order set.
    concurrency: Vec<(String, usize)>,
    tick_intervals: Vec<(String, Duration)>,
    window_problems: Vec<(String, &'static str)>,
    codecs: CodecPlan,
}

/// The codecs a pipeline was given, and its typed tasks' types.
#[derive(Clone, Debug, Default)]
struct CodecPlan {
    default: Codec,
    source: Option<Codec>,
    outputs: Vec<(String, Codec)>,
    typed: Vec<(String, TypeSig)>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field(
                "tasks",
                &self.tasks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("edges", &self.edges)
            .field("groupings", &self.groupings)
            .field("root", &self.root)
            .field(
                "joins",
                &self.joins.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("codecs", &self.codecs)
            .finish()
    }
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Self {
        Pipeline::default()
    }

    /// Adds a task; each worker of the task gets its own clone of `task`.
    pub fn task<T: Task + Clone>(self, task: T) -> Self {
        let name = task.name().to_string();
        let prototype = Mutex::new(task);
        self.task_with(name, move || {
            prototype
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }

    /// Adds a task named `name` whose workers are made by `make`, for tasks
    /// that cannot be cloned.
    pub fn task_with<T, F>(mut self, name: impl Into<String>, make: F) -> Self
    where
        T: Task,
        F: Fn() -> T + Send + Sync + 'static,
    {
        self.tasks.push((
            name.into(),
            Arc::new(move || TaskBody::Sync(Box::new(make()))),
        ));
        self
    }

    /// Adds a join: a task with several parents that handles everything
    /// they emitted for one source message in one call (see
    /// [`JoinTask`]). Each worker of the task gets its own clone of `join`.
    ///
    /// ```
    /// use tempest::{JoinTask, Joined, Msg, MsgCtx, Output, Pipeline, Task, TaskResult};
    ///
    /// #[derive(Clone)]
    /// struct Pass(&'static str);
    /// impl Task for Pass {
    ///     fn name(&self) -> &str { self.0 }
    ///     fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult { Ok(Output::One(msg)) }
    /// }
    ///
    /// #[derive(Clone)]
    /// struct Count;
    /// impl JoinTask for Count {
    ///     fn name(&self) -> &str { "count" }
    ///     fn handle(&mut self, joined: Joined, _: &MsgCtx) -> TaskResult {
    ///         Ok(Output::one(joined.len().to_string()))
    ///     }
    /// }
    ///
    /// let dag = Pipeline::new()
    ///     .task(Pass("split"))
    ///     .task(Pass("left"))
    ///     .task(Pass("right"))
    ///     .join(Count)
    ///     .edge("split", "left")
    ///     .edge("split", "right")
    ///     .edge("left", "count")
    ///     .edge("right", "count")
    ///     .build()
    ///     .unwrap();
    /// assert!(dag.is_join(dag.index_of("count").unwrap()));
    /// ```
    pub fn join<J: JoinTask + Clone>(self, join: J) -> Self {
        let name = join.name().to_string();
        let prototype = Mutex::new(join);
        self.join_with(name, move || {
            prototype
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }

    /// Adds a typed task (see [`TypedTask`]): its input is decoded with the
    /// codec of the message's producer, its outputs encoded with its own
    /// output codec. Each worker gets its own clone of `task`.
    pub fn typed<T: TypedTask + Clone>(self, task: T) -> Self {
        let name = task.name().to_string();
        let prototype = Mutex::new(task);
        self.typed_with(name, move || {
            prototype
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }

    /// Adds an [`AsyncTask`]; each worker of the task gets its own clone
    /// of `task` and keeps up to its concurrency of messages in flight
    /// (see [`concurrency`](Self::concurrency)).
    pub fn async_task<T: AsyncTask + Clone>(self, task: T) -> Self {
        let name = task.name().to_string();
        let prototype = Mutex::new(task);
        self.async_task_with(name, move || {
            prototype
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }

    /// Adds a join named `name` whose workers are made by `make`, for join
    /// tasks that cannot be cloned.
    pub fn join_with<J, F>(mut self, name: impl Into<String>, make: F) -> Self
    where
        J: JoinTask,
        F: Fn() -> J + Send + Sync + 'static,
    {
        let name = name.into();
        let make: JoinFactory = Arc::new(move |parents: &[(TaskIdx, &'static str)]| {
            Box::new(JoinAdapter::new(make(), parents)) as Box<dyn Task>
        });
        // Replaced at build by a factory that knows the parents.
        let unbuilt = Arc::clone(&make);
        self.tasks
            .push((name.clone(), Arc::new(move || TaskBody::Sync(unbuilt(&[])))));
        self.joins.push((name, make));
        self
    }

    /// Adds a typed task named `name` whose workers are made by `make`, for
    /// typed tasks that cannot be cloned.
    pub fn typed_with<T, F>(mut self, name: impl Into<String>, make: F) -> Self
    where
        T: TypedTask,
        F: Fn() -> T + Send + Sync + 'static,
    {
        let name = name.into();
        self.codecs
            .typed
            .push((name.clone(), TypeSig::of::<T::In, T::Out>()));
        self.task_with(name, move || TypedAdapter::new(make()))
    }

    /// Sets the codec of every producer's outputs that
    /// [`output_codec`](Self::output_codec) does not set, and of the
    /// source's payloads unless [`source_codec`](Self::source_codec) does;
    /// [`Codec::Json`] by default.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codecs.default = codec;
        self
    }

    /// Sets the codec of task `task`'s outputs (the last call for a task
    /// wins).
    pub fn output_codec(mut self, task: impl Into<String>, codec: Codec) -> Self {
        self.codecs.outputs.push((task.into(), codec));
        self
    }

    /// Says what the source's payloads are encoded with (the pipeline's
    /// [`codec`](Self::codec) unless set): the root task, if typed, decodes
    /// them with it.
    pub fn source_codec(mut self, codec: Codec) -> Self {
        self.codecs.source = Some(codec);
        self
    }

    /// Adds an [`AsyncTask`] named `name` whose workers are made by `make`,
    /// for tasks that cannot be cloned.
    pub fn async_task_with<T, F>(mut self, name: impl Into<String>, make: F) -> Self
    where
        T: AsyncTask,
        F: Fn() -> T + Send + Sync + 'static,
    {
        let name = name.into();
        self.async_tasks.push(name.clone());
        self.tasks.push((
            name,
            Arc::new(move || TaskBody::Async(Box::new(make()) as Box<dyn AsyncRunner>)),
        ));
        self
    }

    /// How many messages each worker of async task `task` keeps in flight
    /// (default [`DEFAULT_CONCURRENCY`]). `Topology.toml` and
    /// `--concurrency` override it.
    pub fn concurrency(mut self, task: impl Into<String>, n: usize) -> Self {
        self.concurrency.push((task.into(), n));
        self
    }

    /// Adds a window task: `inner`'s aggregation over `window`, following
    /// `clock` (see [`window`](crate::window)). Time windows tick to close
    /// (every quarter of the slide, between 10 ms and 1 s), unless
    /// [`tick_interval`](Self::tick_interval) says otherwise.
    pub fn window<W: crate::window::WindowTask>(
        self,
        inner: W,
        window: crate::window::Window,
        clock: crate::window::Clock,
    ) -> Self {
        let name = inner.name().to_string();
        let task = crate::window::Windowed::new(inner, window, clock);
        let every = task.tick_every();
        let mut p = self.task(task);
        if let Some(problem) = window.problem() {
            p.window_problems.push((name.clone(), problem));
        }
        if let Some(every) = every {
            if !p.tick_intervals.iter().any(|(t, _)| *t == name) {
                p.tick_intervals.push((name, every));
            }
        }
        p
    }

    /// Asks for a tick of sync task `task` every `every`: each of its
    /// workers calls [`Task::tick`](crate::Task::tick) on its own loop,
    /// between messages (`tick_interval` in `Topology.toml` overrides it).
    pub fn tick_interval(mut self, task: impl Into<String>, every: Duration) -> Self {
        self.tick_intervals.push((task.into(), every));
        self
    }

    /// Adds an edge: every output of `from` goes to `to`, to any of its
    /// workers ([`Grouping::Shuffle`]).
    pub fn edge(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.edges.push((from.into(), to.into()));
        self
    }

    /// Adds an edge whose messages spread over `to`'s workers by
    /// `grouping`: `.edge_by("split", "count", Grouping::Key)` sends every
    /// word to the same counter.
    pub fn edge_by(
        self,
        from: impl Into<String>,
        to: impl Into<String>,
        grouping: Grouping,
    ) -> Self {
        let (from, to) = (from.into(), to.into());
        self.edge(from.clone(), to.clone())
            .grouping(from, to, grouping)
    }

    /// Sets the grouping of the edge from `from` to `to` (which must be an
    /// edge of the pipeline; `Topology.toml`'s `[[edge]]` tables use this).
    pub fn grouping(
        mut self,
        from: impl Into<String>,
        to: impl Into<String>,
        grouping: Grouping,
    ) -> Self {
        self.groupings.push((from.into(), to.into(), grouping));
        self
    }

    /// Names the root task. Without it, the root is the one task that has no
    /// parent.
    pub fn root(mut self, name: impl Into<String>) -> Self {
        self.root = Some(name.into());
        self
    }

    /// The names of the tasks added so far, in order.
    pub fn task_names(&self) -> impl Iterator<Item = &str> {
        self.tasks.iter().map(|(n, _)| n.as_str())
    }

    /// Checks the pipeline and compiles it, or returns every problem found.
    pub fn build(&self) -> Result<Dag, PipelineErrors> {
        let mut errors = Vec::new();
        if self.tasks.is_empty() {
            errors.push(PipelineError::Empty);
        }
        if self.tasks.len() > MAX_TASKS {
            errors.push(PipelineError::TooManyTasks(self.tasks.len()));
            return Err(PipelineErrors(errors));
        }
        let mut index: HashMap<&str, TaskIdx> = HashMap::new();
        for (name, _) in &self.tasks {
            if name.is_empty() {
                errors.push(PipelineError::EmptyName);
            }
            if index.contains_key(name.as_str()) {
                if !errors.contains(&PipelineError::DuplicateTask(name.clone())) {
                    errors.push(PipelineError::DuplicateTask(name.clone()));
                }
            } else {
                index.insert(name, index.len() as TaskIdx);
            }
        }
        let names: Vec<String> = {
            let mut v = vec![String::new(); index.len()];
            for (name, &i) in &index {
                v[i as usize] = name.to_string();
            }
            v
        };
        let mut factories: Vec<TaskFactory> = {
            let mut seen = vec![false; names.len()];
            let mut v = Vec::with_capacity(names.len());
            for (name, f) in &self.tasks {
                let i = index[name.as_str()] as usize;
                if !seen[i] {
                    seen[i] = true;
                    v.push(Arc::clone(f));
                }
            }
            v
        };

        let n = names.len();
        let mut children: Vec<Vec<TaskIdx>> = vec![Vec::new(); n];
        let mut parents: Vec<Vec<TaskIdx>> = vec![Vec::new(); n];
        for (from, to) in &self.edges {
            let mut known = true;
            for end in [from, to] {
                if !index.contains_key(end.as_str()) {
                    known = false;
                    errors.push(PipelineError::UnknownTask {
                        edge: (from.clone(), to.clone()),
                        name: end.clone(),
                    });
                }
            }
            if !known {
                continue;
            }
            if from == to {
                errors.push(PipelineError::SelfEdge(from.clone()));
                continue;
            }
            let (a, b) = (index[from.as_str()], index[to.as_str()]);
            if children[a as usize].contains(&b) {
                errors.push(PipelineError::DuplicateEdge(from.clone(), to.clone()));
                continue;
            }
            children[a as usize].push(b);
            parents[b as usize].push(a);
        }
        let mut edge_groupings: Vec<Vec<Grouping>> = children
            .iter()
            .map(|c| vec![Grouping::Shuffle; c.len()])
            .collect();
        for (from, to, grouping) in &self.groupings {
            let at = index.get(from.as_str()).and_then(|&a| {
                let b = index.get(to.as_str())?;
                let pos = children[a as usize].iter().position(|c| c == b)?;
                Some((a as usize, pos))
            });
            match at {
                Some((a, pos)) => edge_groupings[a][pos] = *grouping,
                None => errors.push(PipelineError::GroupingOnUnknownEdge {
                    from: from.clone(),
                    to: to.clone(),
                }),
            }
        }

        let mut joins = vec![false; n];
        for (name, make) in &self.joins {
            let Some(&i) = index.get(name.as_str()) else {
                continue;
            };
            let i = i as usize;
            if joins[i] {
                // A duplicate name, reported above.
                continue;
            }
            joins[i] = true;
            let into: Vec<Grouping> = parents[i]
                .iter()
                .map(|&p| {
                    let pos = children[p as usize].iter().position(|&c| c as usize == i);
                    pos.map_or(Grouping::Shuffle, |pos| edge_groupings[p as usize][pos])
                })
                .collect();
            if into.windows(2).any(|w| w[0] != w[1]) {
                errors.push(PipelineError::JoinGroupings {
                    task: name.clone(),
                    groupings: parents[i]
                        .iter()
                        .zip(&into)
                        .map(|(&p, g)| (names[p as usize].clone(), *g))
                        .collect(),
                });
            }
            if parents[i].len() < 2 {
                errors.push(PipelineError::JoinNeedsParents {
                    task: name.clone(),
                    parents: parents[i].len(),
                });
            }
            let join_parents: Vec<(TaskIdx, &'static str)> = parents[i]
                .iter()
                .map(|&p| (p, intern(&names[p as usize]).1))
                .collect();
            let make = Arc::clone(make);
            factories[i] = Arc::new(move || TaskBody::Sync(make(&join_parents)));
        }

        for cycle in find_cycles(&children) {
            errors.push(PipelineError::Cycle(
                cycle.iter().map(|&i| names[i as usize].clone()).collect(),
            ));
        }

        let root = match &self.root {
            Some(r) => match index.get(r.as_str()) {
                None => {
                    errors.push(PipelineError::UnknownRoot(r.clone()));
                    None
                }
                Some(&i) if !parents[i as usize].is_empty() => {
                    errors.push(PipelineError::RootHasParents(r.clone()));
                    None
                }
                Some(&i) => Some(i),
            },
            None => {
                let roots: Vec<TaskIdx> = (0..n as TaskIdx)
                    .filter(|&i| parents[i as usize].is_empty())
                    .collect();
                match roots.as_slice() {
                    [] if n > 0 => {
                        errors.push(PipelineError::NoRoot);
                        None
                    }
                    [] => None,
                    [r] => Some(*r),
                    many => {
                        errors.push(PipelineError::MultipleRoots(
                            many.iter().map(|&i| names[i as usize].clone()).collect(),
                        ));
                        None
                    }
                }
            }
        };

        if let Some(root) = root {
            let mut reached = vec![false; n];
            let mut queue = VecDeque::from([root]);
            reached[root as usize] = true;
            while let Some(t) = queue.pop_front() {
                for &c in &children[t as usize] {
                    if !reached[c as usize] {
                        reached[c as usize] = true;
                        queue.push_back(c);
                    }
                }
            }
            for (i, r) in reached.iter().enumerate() {
                if !r {
                    errors.push(PipelineError::Unreachable(names[i].clone()));
                }
            }
        }

        let (codecs, types) = self.check_codecs(&index, &names, &parents, root, &mut errors);

        let mut concurrency: Vec<Option<usize>> = names
            .iter()
            .map(|n| self.async_tasks.contains(n).then_some(DEFAULT_CONCURRENCY))
            .collect();
        for (task, n) in &self.concurrency {
            let problem = match index.get(task.as_str()) {
                None => Some("it is not a task of the pipeline".to_string()),
                Some(_) if *n == 0 => Some("it must be at least 1".to_string()),
                Some(&i) => match &mut concurrency[i as usize] {
                    None => Some("it is a sync task; only async tasks take a concurrency".into()),
                    Some(c) => {
                        *c = *n;
                        None
                    }
                },
            };
            if let Some(problem) = problem {
                errors.push(PipelineError::Concurrency {
                    task: task.clone(),
                    problem,
                });
            }
        }

        for (task, problem) in &self.window_problems {
            errors.push(PipelineError::Window {
                task: task.clone(),
                problem: problem.to_string(),
            });
        }
        let mut ticks: Vec<Option<Duration>> = vec![None; names.len()];
        for (task, every) in &self.tick_intervals {
            let problem = match index.get(task.as_str()) {
                None => Some("it is not a task of the pipeline"),
                Some(_) if every.is_zero() => Some("it must be more than 0"),
                Some(_) if self.async_tasks.contains(task) => {
                    Some("it is an async task; only sync tasks tick")
                }
                Some(&i) => {
                    ticks[i as usize] = Some(*every);
                    None
                }
            };
            if let Some(problem) = problem {
                errors.push(PipelineError::TickInterval {
                    task: task.clone(),
                    problem: problem.to_string(),
                });
            }
        }

        match root {
            Some(root) if errors.is_empty() => {
                let mut dag = Dag::new(names, root, children, parents, factories, joins);
                dag.groupings = edge_groupings;
                dag.codecs = codecs;
                dag.types = types;
                dag.concurrency = concurrency;
                dag.ticks = ticks;
                Ok(dag)
            }
            _ => Err(PipelineErrors(errors)),
        }
    }

    /// Every producer's output codec and every typed task's types, by task
    /// index; adds to `errors` what cannot work: a codec for an unknown
    /// task, a typed task with raw outputs or fed raw bytes, a postcard edge
    /// between typed tasks of different types.
    fn check_codecs(
        &self,
        index: &HashMap<&str, TaskIdx>,
        names: &[String],
        parents: &[Vec<TaskIdx>],
        root: Option<TaskIdx>,
        errors: &mut Vec<PipelineError>,
    ) -> (EdgeCodecs, Vec<Option<TypeSig>>) {
        let plan = &self.codecs;
        let mut outputs = vec![plan.default; names.len()];
        for (name, codec) in &plan.outputs {
            match index.get(name.as_str()) {
                Some(&i) => outputs[i as usize] = *codec,
                None => {
                    let e = PipelineError::UnknownCodecTask(name.clone());
                    if !errors.contains(&e) {
                        errors.push(e);
                    }
                }
            }
        }
        let mut types: Vec<Option<TypeSig>> = vec![None; names.len()];
        for (name, sig) in &plan.typed {
            if let Some(&i) = index.get(name.as_str()) {
                types[i as usize].get_or_insert(*sig);
            }
        }
        let source = plan.source.unwrap_or(plan.default);
        for (t, sig) in types.iter().enumerate() {
            let Some(sig) = sig else { continue };
            let task = &names[t];
            if outputs[t] == Codec::Raw {
                errors.push(PipelineError::TypedRawOutput(task.clone()));
            }
            if root == Some(t as TaskIdx) && source == Codec::Raw {
                errors.push(PipelineError::RawInput {
                    task: task.clone(),
                    input_type: sig.in_name.to_string(),
                    from: None,
                });
            }
            for &p in &parents[t] {
                let p = p as usize;
                match (outputs[p], types[p]) {
                    (Codec::Raw, _) => errors.push(PipelineError::RawInput {
                        task: task.clone(),
                        input_type: sig.in_name.to_string(),
                        from: Some(names[p].clone()),
                    }),
                    (Codec::Postcard, Some(from)) if from.out_id != sig.in_id => {
                        errors.push(PipelineError::PostcardTypeMismatch {
                            from: names[p].clone(),
                            to: task.clone(),
                            out_type: from.out_name.to_string(),
                            in_type: sig.in_name.to_string(),
                        })
                    }
                    _ => {}
                }
            }
        }
        let codecs = EdgeCodecs {
            source,
            tasks: outputs.into(),
        };
        (codecs, types)
    }
}

/// Every elementary cycle found by a depth-first search, each once, as the
/// path of task indices starting from its smallest index.
fn find_cycles(children: &[Vec<TaskIdx>]) -> Vec<Vec<TaskIdx>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Color {
        White,
        Grey,
        Black,
    }
    let n = children.len();
    let mut color = vec![Color::White; n];
    let mut cycles: Vec<Vec<TaskIdx>> = Vec::new();
    for start in 0..n {
        if color[start] != Color::White {
            continue;
        }
        // Stack of (node, next child position); `path` mirrors the grey nodes.
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        let mut path: Vec<TaskIdx> = vec![start as TaskIdx];
        color[start] = Color::Grey;
        while let Some(&mut (node, ref mut pos)) = stack.last_mut() {
            if let Some(&child) = children[node].get(*pos) {
                *pos += 1;
                let c = child as usize;
                match color[c] {
                    Color::White => {
                        color[c] = Color::Grey;
                        stack.push((c, 0));
                        path.push(child);
                    }
                    Color::Grey => {
                        let at = path.iter().position(|&p| p == child).unwrap_or(0);
                        let mut cycle = path[at..].to_vec();
                        let min = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, &v)| v)
                            .map(|(i, _)| i);
                        cycle.rotate_left(min.unwrap_or(0));
                        if !cycles.contains(&cycle) {
                            cycles.push(cycle);
                        }
                    }
                    Color::Black => {}
                }
            } else {
                color[node] = Color::Black;
                stack.pop();
                path.pop();
            }
        }
    }
    cycles
}

/// One problem with a pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PipelineError {
    /// The pipeline has no task.
    Empty,
    /// More tasks than [`MAX_TASKS`].
    TooManyTasks(usize),
    /// A task's name is empty.
    EmptyName,
    /// Two tasks share a name.
    DuplicateTask(String),
    /// An edge names a task the pipeline does not have.
    UnknownTask {
        /// The edge, as given.
        edge: (String, String),
        /// The unknown name.
        name: String,
    },
    /// An edge from a task to itself.
    SelfEdge(String),
    /// The same edge twice.
    DuplicateEdge(String, String),
    /// A cycle, as the path of task names around it.
    Cycle(Vec<String>),
    /// Every task has a parent, so none can be the root.
    NoRoot,
    /// Several tasks have no parent; name one with `.root(..)` and connect the others.
    MultipleRoots(Vec<String>),
    /// `.root(..)` names a task the pipeline does not have.
    UnknownRoot(String),
    /// `.root(..)` names a task that has a parent.
    RootHasParents(String),
    /// A task the root does not lead to.
    Unreachable(String),
    /// A join task with fewer than two parents: there is nothing to join.
    JoinNeedsParents {
        /// The join task.
        task: String,
        /// How many parents it has.
        parents: usize,
    },
    /// `.output_codec(..)` names a task the pipeline does not have.
    UnknownCodecTask(String),
    /// A typed task whose output codec is [`Codec::Raw`]: its values need a
    /// codec.
    TypedRawOutput(String),
    /// A typed task reads from a producer whose codec is [`Codec::Raw`].
    RawInput {
        /// The typed task.
        task: String,
        /// The type it reads.
        input_type: String,
        /// The producer: a task, or `None` for the source.
        from: Option<String>,
    },
    /// A postcard edge between typed tasks of different types: postcard is
    /// not self-describing, so the consumer would misread the bytes.
    PostcardTypeMismatch {
        /// The producer.
        from: String,
        /// The consumer.
        to: String,
        /// The type the producer writes.
        out_type: String,
        /// The type the consumer reads.
        in_type: String,
    },
    /// A grouping set on an edge the pipeline does not have.
    GroupingOnUnknownEdge {
        /// The edge's producer, as given.
        from: String,
        /// The edge's consumer, as given.
        to: String,
    },
    /// The edges into a join group differently: its one message per source
    /// message goes to one worker, so they must agree.
    JoinGroupings {
        /// The join task.
        task: String,
        /// Each parent with the grouping of its edge.
        groupings: Vec<(String, Grouping)>,
    },
    /// A concurrency that cannot be set.
    Concurrency {
        /// The task named.
        task: String,
        /// Why not.
        problem: String,
    },
    /// A window that cannot be cut.
    Window {
        /// The window task.
        task: String,
        /// Why not.
        problem: String,
    },
    /// A tick interval that cannot be set.
    TickInterval {
        /// The task named.
        task: String,
        /// Why not.
        problem: String,
    },
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineError::Empty => f.write_str("the pipeline has no task"),
            PipelineError::TooManyTasks(n) => {
                write!(
                    f,
                    "the pipeline has {n} tasks; at most {MAX_TASKS} are allowed"
                )
            }
            PipelineError::EmptyName => f.write_str("a task has an empty name"),
            PipelineError::DuplicateTask(name) => {
                write!(f, "two tasks are named \"{name}\"")
            }
            PipelineError::UnknownTask { edge, name } => write!(
                f,
                "edge \"{}\" -> \"{}\" names unknown task \"{name}\"",
                edge.0, edge.1
            ),
            PipelineError::SelfEdge(name) => {
                write!(f, "edge \"{name}\" -> \"{name}\" is a self-edge")
            }
            PipelineError::DuplicateEdge(a, b) => {
                write!(f, "edge \"{a}\" -> \"{b}\" is given twice")
            }
            PipelineError::Cycle(path) => {
                write!(f, "cycle: ")?;
                for name in path {
                    write!(f, "\"{name}\" -> ")?;
                }
                write!(f, "\"{}\"", path.first().map(String::as_str).unwrap_or(""))
            }
            PipelineError::NoRoot => f.write_str("no root: every task has a parent"),
            PipelineError::MultipleRoots(names) => write!(
                f,
                "several tasks have no parent ({}); a pipeline has exactly one root",
                quoted(names)
            ),
            PipelineError::UnknownRoot(name) => {
                write!(f, "root \"{name}\" is not a task of the pipeline")
            }
            PipelineError::RootHasParents(name) => {
                write!(f, "root \"{name}\" has a parent; the root must have none")
            }
            PipelineError::Unreachable(name) => {
                write!(f, "task \"{name}\" cannot be reached from the root")
            }
            PipelineError::JoinNeedsParents { task, parents } => write!(
                f,
                "join task \"{task}\" has {parents} parent{}; a join needs at least two",
                if *parents == 1 { "" } else { "s" }
            ),
            PipelineError::UnknownCodecTask(name) => {
                write!(f, "output_codec names unknown task \"{name}\"")
            }
            PipelineError::TypedRawOutput(name) => write!(
                f,
                "typed task \"{name}\" has the raw output codec; a typed task's \
                 outputs need a codec (json or postcard)"
            ),
            PipelineError::RawInput {
                task,
                input_type,
                from: Some(from),
            } => write!(
                f,
                "typed task \"{task}\" reads {input_type} from \"{from}\", whose \
                 outputs are raw bytes; give \"{from}\" a codec with output_codec"
            ),
            PipelineError::RawInput {
                task,
                input_type,
                from: None,
            } => write!(
                f,
                "typed root task \"{task}\" reads {input_type} from the source, whose \
                 payloads are raw bytes; say what they are with source_codec"
            ),
            PipelineError::PostcardTypeMismatch {
                from,
                to,
                out_type,
                in_type,
            } => write!(
                f,
                "edge \"{from}\" -> \"{to}\" is postcard, but \"{from}\" writes \
                 {out_type} and \"{to}\" reads {in_type}; postcard is not \
                 self-describing: use one type at both ends, or JSON on this edge"
            ),
            PipelineError::Concurrency { task, problem } => {
                write!(f, "concurrency for task \"{task}\": {problem}")
            }
            PipelineError::Window { task, problem } => {
                write!(f, "window of task \"{task}\": {problem}")
            }
            PipelineError::TickInterval { task, problem } => {
                write!(f, "tick interval for task \"{task}\": {problem}")
            }
            PipelineError::GroupingOnUnknownEdge { from, to } => write!(
                f,
                "a grouping is set on the edge \"{from}\" -> \"{to}\", which the pipeline does not have"
            ),
            PipelineError::JoinGroupings { task, groupings } => {
                let each: Vec<String> = groupings
                    .iter()
                    .map(|(p, g)| format!("\"{p}\" -> \"{task}\" is {g}"))
                    .collect();
                write!(
                    f,
                    "the edges into join task \"{task}\" must group alike: {}",
                    each.join(", ")
                )
            }
        }
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every problem found in a pipeline, reported together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineErrors(pub Vec<PipelineError>);

impl PipelineErrors {
    /// The problems, in the order found.
    pub fn errors(&self) -> &[PipelineError] {
        &self.0
    }
}

impl fmt::Display for PipelineErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the pipeline is invalid ({} problem", self.0.len())?;
        if self.0.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str("):")?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PipelineErrors {}

/// A validated pipeline: tasks and edges as small integers.
#[derive(Clone)]
pub struct Dag {
    names: Vec<String>,
    /// Each task as a parent: its index and its name's interned number,
    /// which a message's context carries to name its parent without a
    /// lifetime or an allocation.
    as_parents: Vec<crate::msg::Parent>,
    root: TaskIdx,
    children: Vec<Vec<TaskIdx>>,
    parents: Vec<Vec<TaskIdx>>,
    /// For a task with several parents, its slot among the fan-in tasks.
    fanin: Vec<Option<u16>>,
    fanin_count: usize,
    factories: Vec<TaskFactory>,
    /// Whether each task is a join.
    joins: Vec<bool>,
    /// Every producer's output codec.
    codecs: EdgeCodecs,
    /// The types of the typed tasks.
    types: Vec<Option<TypeSig>>,
    /// Per task: its workers' concurrency if it is async, `None` if sync.
    concurrency: Vec<Option<usize>>,
    /// Per task, the grouping of the edge to each child (as `children`).
    groupings: Vec<Vec<Grouping>>,
    /// Per task: how often its workers tick, if they do.
    ticks: Vec<Option<Duration>>,
}

impl fmt::Debug for Dag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dag")
            .field("names", &self.names)
            .field("root", &self.root)
            .field("children", &self.children)
            .finish_non_exhaustive()
    }
}

impl Dag {
    fn new(
        names: Vec<String>,
        root: TaskIdx,
        children: Vec<Vec<TaskIdx>>,
        parents: Vec<Vec<TaskIdx>>,
        factories: Vec<TaskFactory>,
        joins: Vec<bool>,
    ) -> Self {
        let mut fanin_count = 0;
        let fanin = parents
            .iter()
            .map(|p| {
                (p.len() > 1).then(|| {
                    fanin_count += 1;
                    (fanin_count - 1) as u16
                })
            })
            .collect();
        Dag {
            as_parents: names
                .iter()
                .enumerate()
                .map(|(t, n)| crate::msg::Parent {
                    task: t as TaskIdx,
                    name: intern(n).0,
                })
                .collect(),
            names,
            root,
            children,
            parents,
            fanin,
            concurrency: vec![None; factories.len()],
            ticks: vec![None; factories.len()],
            fanin_count,
            factories,
            joins,
            codecs: EdgeCodecs::default(),
            types: Vec::new(),
            groupings: Vec::new(),
        }
    }

    /// The grouping of the edge from `from` to `to`; shuffle for an edge it
    /// does not have (the source's messages to the root are shuffled).
    pub fn grouping(&self, from: TaskIdx, to: TaskIdx) -> Grouping {
        let f = from as usize;
        self.children
            .get(f)
            .and_then(|c| c.iter().position(|&t| t == to))
            .and_then(|pos| self.groupings.get(f)?.get(pos).copied())
            .unwrap_or_default()
    }

    /// Sets the grouping of the edge from the task named `from` to the one
    /// named `to` (`Topology.toml`'s `[[edge]]`); false if there is no such
    /// edge.
    pub(crate) fn set_grouping(&mut self, from: &str, to: &str, grouping: Grouping) -> bool {
        let (Some(a), Some(b)) = (self.index_of(from), self.index_of(to)) else {
            return false;
        };
        let Some(pos) = self.children[a as usize].iter().position(|&c| c == b) else {
            return false;
        };
        if let Some(g) = self
            .groupings
            .get_mut(a as usize)
            .and_then(|g| g.get_mut(pos))
        {
            *g = grouping;
        }
        true
    }

    /// How often task `t`'s workers tick (`None`: they do not).
    pub fn tick_interval(&self, t: TaskIdx) -> Option<Duration> {
        self.ticks.get(t as usize).copied().flatten()
    }

    /// Sets how often task `t`'s workers tick (`Topology.toml`'s
    /// `tick_interval`).
    pub(crate) fn set_tick_interval(&mut self, t: TaskIdx, every: Option<Duration>) {
        if let Some(x) = self.ticks.get_mut(t as usize) {
            *x = every;
        }
    }

    /// The groupings of the edges from `t` to its children, in the order of
    /// [`children`](Self::children).
    pub(crate) fn child_groupings(&self, t: TaskIdx) -> &[Grouping] {
        self.groupings.get(t as usize).map_or(&[], Vec::as_slice)
    }

    /// The grouping of a message for task `t` from `parent` (`NO_TASK`:
    /// from the source, shuffled, or a join's, which all its parent edges
    /// share).
    pub(crate) fn grouping_into(&self, parent: TaskIdx, t: TaskIdx) -> Grouping {
        if parent != crate::msg::NO_TASK {
            return self.grouping(parent, t);
        }
        match self.parents(t).first() {
            Some(&p) if self.is_join(t) => self.grouping(p, t),
            _ => Grouping::Shuffle,
        }
    }

    /// Whether any edge into task `t` pins its messages to chosen workers.
    pub fn has_pinned_input(&self, t: TaskIdx) -> bool {
        self.parents(t)
            .iter()
            .any(|&p| self.grouping(p, t).is_pinned())
    }

    /// Whether any edge into task `t` needs its messages to have a key.
    pub fn has_keyed_input(&self, t: TaskIdx) -> bool {
        self.parents(t)
            .iter()
            .any(|&p| self.grouping(p, t).needs_key())
    }

    /// The first of `outputs` of task `t` that lacks the key an edge from
    /// `t` needs: its index and that edge's child.
    pub(crate) fn keyless_output(
        &self,
        t: TaskIdx,
        outputs: &[crate::msg::Emitted],
    ) -> Option<(usize, TaskIdx)> {
        let groupings = self.child_groupings(t);
        let child = groupings.iter().position(|g| g.needs_key())?;
        let i = outputs.iter().position(|o| o.key().is_none())?;
        Some((i, self.children(t)[child]))
    }

    /// How many tasks there are.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Always false: a valid pipeline has a task.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The root task's index.
    pub fn root(&self) -> TaskIdx {
        self.root
    }

    /// The root task's name.
    pub fn root_name(&self) -> &str {
        &self.names[self.root as usize]
    }

    /// Task names by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The name of task `t`.
    pub fn name(&self, t: TaskIdx) -> &str {
        &self.names[t as usize]
    }

    /// Fills in the parent names of messages decoded from the wire (which
    /// carries their indices).
    pub(crate) fn name_parents(&self, msgs: &mut [crate::msg::TaskMsg]) {
        for m in msgs {
            m.ctx.parent.name = self.name_id(m.ctx.parent.task);
        }
    }

    /// The interned number of task `t`'s name (`NO_NAME` for `NO_TASK`).
    pub(crate) fn name_id(&self, t: TaskIdx) -> crate::msg::NameId {
        self.parent(t).name
    }

    /// Task `t` as the parent of the messages it emits (`FROM_SOURCE` for
    /// `NO_TASK`).
    pub(crate) fn parent(&self, t: TaskIdx) -> crate::msg::Parent {
        self.as_parents
            .get(t as usize)
            .copied()
            .unwrap_or(crate::msg::FROM_SOURCE)
    }

    /// The index of the task named `name`.
    pub fn index_of(&self, name: &str) -> Option<TaskIdx> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| i as TaskIdx)
    }

    /// The children of task `t`.
    pub fn children(&self, t: TaskIdx) -> &[TaskIdx] {
        &self.children[t as usize]
    }

    /// The parents of task `t`.
    pub fn parents(&self, t: TaskIdx) -> &[TaskIdx] {
        &self.parents[t as usize]
    }

    pub(crate) fn fanin_slot(&self, t: TaskIdx) -> Option<u16> {
        self.fanin[t as usize]
    }

    /// Whether task `t` is a join ([`Pipeline::join`]): it runs once per
    /// source message with everything its parents emitted.
    pub fn is_join(&self, t: TaskIdx) -> bool {
        self.joins.get(t as usize).copied().unwrap_or(false)
    }

    pub(crate) fn fanin_count(&self) -> usize {
        self.fanin_count
    }

    pub(crate) fn make_task(&self, t: TaskIdx) -> TaskBody {
        (self.factories[t as usize])()
    }

    /// The codec of the outputs of task `t`, which its children decode
    /// them with. (An index that names no task, such as the parent of the
    /// root's messages, gives the source's codec.)
    pub fn output_codec(&self, t: TaskIdx) -> Codec {
        self.codecs.of(t)
    }

    /// The codec of the source's payloads.
    pub fn source_codec(&self) -> Codec {
        self.codecs.source
    }

    /// The codecs a worker of task `t` works with, for its
    /// [`TaskContext`](crate::TaskContext).
    pub(crate) fn task_codecs(&self, t: TaskIdx) -> TaskCodecs {
        TaskCodecs {
            inputs: self.codecs.clone(),
            output: self.codecs.of(t),
        }
    }

    /// The names of the types typed task `t` reads and writes (`None`: an
    /// untyped task).
    pub fn task_types(&self, t: TaskIdx) -> Option<(&'static str, &'static str)> {
        self.types
            .get(t as usize)
            .copied()
            .flatten()
            .map(|s| (s.in_name, s.out_name))
    }

    /// Whether task `t` is an [`AsyncTask`].
    pub fn is_async(&self, t: TaskIdx) -> bool {
        self.concurrency
            .get(t as usize)
            .is_some_and(Option::is_some)
    }

    /// The concurrency of async task `t` as the pipeline sets it (`None`
    /// for a sync task).
    pub fn concurrency(&self, t: TaskIdx) -> Option<usize> {
        self.concurrency.get(t as usize).copied().flatten()
    }

    /// The DAG in Graphviz DOT.
    pub fn to_dot(&self, name: &str) -> String {
        let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n", escape(name));
        for (i, n) in self.names.iter().enumerate() {
            let shape = if i == self.root as usize {
                "box"
            } else {
                "ellipse"
            };
            out.push_str(&format!("  \"{}\" [shape={shape}];\n", escape(n)));
        }
        for (from, tos) in self.children.iter().enumerate() {
            for &to in tos {
                let g = self.grouping(from as TaskIdx, to);
                let label = if g == Grouping::Shuffle {
                    String::new()
                } else {
                    format!(" [label=\"{g}\"]")
                };
                out.push_str(&format!(
                    "  \"{}\" -> \"{}\"{label};\n",
                    escape(&self.names[from]),
                    escape(&self.names[to as usize])
                ));
            }
        }
        out.push_str("}\n");
        out
    }

    /// The DAG as a Mermaid flowchart.
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        for (i, n) in self.names.iter().enumerate() {
            out.push_str(&format!("  t{i}[\"{}\"]\n", n.replace('"', "#quot;")));
        }
        for (from, tos) in self.children.iter().enumerate() {
            for &to in tos {
                match self.grouping(from as TaskIdx, to) {
                    Grouping::Shuffle => out.push_str(&format!("  t{from} --> t{to}\n")),
                    g => out.push_str(&format!("  t{from} -->|{g}| t{to}\n")),
                }
            }
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::task::PassOn as T;

    fn pipe(names: &[&'static str], edges: &[(&str, &str)]) -> Pipeline {
        let mut p = Pipeline::new();
        for n in names {
            p = p.task(T(n));
        }
        for (a, b) in edges {
            p = p.edge(*a, *b);
        }
        p
    }

    fn errors(p: Pipeline) -> Vec<PipelineError> {
        p.build().unwrap_err().0
    }

    #[test]
    fn a_linear_pipeline_compiles() {
        let dag = pipe(&["a", "b", "c"], &[("a", "b"), ("b", "c")])
            .build()
            .unwrap();
        assert_eq!(dag.len(), 3);
        assert_eq!(dag.root_name(), "a");
        assert_eq!(dag.children(0), &[1]);
        assert_eq!(dag.parents(2), &[1]);
        assert_eq!(dag.fanin_slot(2), None);
    }

    #[test]
    fn a_diamond_has_one_fanin() {
        let dag = pipe(
            &["a", "b", "c", "d"],
            &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
        )
        .build()
        .unwrap();
        assert_eq!(dag.fanin_slot(3), Some(0));
        assert_eq!(dag.fanin_count(), 1);
    }

    #[test]
    fn empty_pipeline() {
        assert_eq!(errors(Pipeline::new()), vec![PipelineError::Empty]);
    }

    #[test]
    fn duplicate_task() {
        assert_eq!(
            errors(pipe(&["a", "a"], &[])),
            vec![PipelineError::DuplicateTask("a".into())]
        );
    }

    #[test]
    fn unknown_task_in_edge() {
        assert_eq!(
            errors(pipe(&["a"], &[("a", "b")])),
            vec![PipelineError::UnknownTask {
                edge: ("a".into(), "b".into()),
                name: "b".into()
            }]
        );
    }

    #[test]
    fn self_edge() {
        assert_eq!(
            errors(pipe(&["a"], &[("a", "a")])),
            vec![PipelineError::SelfEdge("a".into())]
        );
    }

    #[test]
    fn duplicate_edge() {
        assert_eq!(
            errors(pipe(&["a", "b"], &[("a", "b"), ("a", "b")])),
            vec![PipelineError::DuplicateEdge("a".into(), "b".into())]
        );
    }

    #[test]
    fn cycle_with_its_path() {
        let errs = errors(pipe(
            &["a", "b", "c", "d"],
            &[("a", "b"), ("b", "c"), ("c", "d"), ("d", "b")],
        ));
        assert_eq!(
            errs,
            vec![PipelineError::Cycle(vec![
                "b".into(),
                "c".into(),
                "d".into()
            ])]
        );
        assert_eq!(
            errs[0].to_string(),
            "cycle: \"b\" -> \"c\" -> \"d\" -> \"b\""
        );
    }

    #[test]
    fn no_root() {
        let errs = errors(pipe(&["a", "b"], &[("a", "b"), ("b", "a")]));
        assert!(errs.contains(&PipelineError::NoRoot), "{errs:?}");
        assert!(errs.contains(&PipelineError::Cycle(vec!["a".into(), "b".into()])));
    }

    #[test]
    fn several_roots() {
        assert_eq!(
            errors(pipe(&["a", "b", "c"], &[("a", "c"), ("b", "c")])),
            vec![PipelineError::MultipleRoots(vec!["a".into(), "b".into()])]
        );
    }

    #[test]
    fn unknown_root_and_root_with_parents() {
        assert_eq!(
            errors(pipe(&["a", "b"], &[("a", "b")]).root("z")),
            vec![PipelineError::UnknownRoot("z".into())]
        );
        assert_eq!(
            errors(pipe(&["a", "b"], &[("a", "b")]).root("b")),
            vec![PipelineError::RootHasParents("b".into())]
        );
    }

    #[test]
    fn unreachable_task() {
        assert_eq!(
            errors(pipe(&["a", "b", "c"], &[("a", "b"), ("c", "b")]).root("a")),
            vec![PipelineError::Unreachable("c".into())]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let errs = errors(pipe(
            &["a", "b", "b", "c"],
            &[("a", "x"), ("a", "a"), ("b", "c"), ("c", "b")],
        ));
        assert!(errs.contains(&PipelineError::DuplicateTask("b".into())));
        assert!(errs
            .iter()
            .any(|e| matches!(e, PipelineError::UnknownTask { .. })));
        assert!(errs.contains(&PipelineError::SelfEdge("a".into())));
        assert!(errs.contains(&PipelineError::Cycle(vec!["b".into(), "c".into()])));
        let text = PipelineErrors(errs.clone()).to_string();
        assert!(text.starts_with(&format!(
            "the pipeline is invalid ({} problems):",
            errs.len()
        )));
    }

    #[derive(Clone)]
    struct J(&'static str);
    impl JoinTask for J {
        fn name(&self) -> &str {
            self.0
        }
        fn handle(
            &mut self,
            _: crate::join::Joined,
            _: &crate::msg::MsgCtx,
        ) -> crate::task::TaskResult {
            Ok(crate::task::Output::None)
        }
    }

    /// A typed task from `I` to `O` that passes nothing on.
    #[derive(Clone, Copy)]
    struct Ty<I, O>(&'static str, std::marker::PhantomData<fn(I) -> O>);

    fn ty<I, O>(name: &'static str) -> Ty<I, O> {
        Ty(name, std::marker::PhantomData)
    }

    impl<I, O> TypedTask for Ty<I, O>
    where
        I: serde::de::DeserializeOwned + Send + 'static,
        O: serde::Serialize + Send + 'static,
    {
        type In = I;
        type Out = O;
        fn name(&self) -> &str {
            self.0
        }
        fn handle(&mut self, _: I, _: &crate::MsgCtx) -> crate::TypedResult<O> {
            Ok(crate::Typed::None)
        }
    }

    #[test]
    fn a_join_needs_two_parents() {
        let errs = errors(pipe(&["a", "b"], &[("a", "b"), ("b", "j")]).join(J("j")));
        assert_eq!(
            errs,
            vec![PipelineError::JoinNeedsParents {
                task: "j".into(),
                parents: 1
            }]
        );
        assert_eq!(
            errs[0].to_string(),
            "join task \"j\" has 1 parent; a join needs at least two"
        );
        // As the root, with no parent, among other problems.
        let errs = errors(
            Pipeline::new()
                .join(J("j"))
                .task(T("a"))
                .edge("j", "a")
                .edge("a", "x"),
        );
        assert!(errs.contains(&PipelineError::JoinNeedsParents {
            task: "j".into(),
            parents: 0
        }));
        assert!(errs.len() > 1, "{errs:?}");

        let dag = pipe(
            &["a", "b", "c"],
            &[("a", "b"), ("a", "c"), ("b", "j"), ("c", "j")],
        )
        .join(J("j"))
        .build()
        .unwrap();
        let j = dag.index_of("j").unwrap();
        assert!(dag.is_join(j));
        assert!(!dag.is_join(0));
        assert_eq!(dag.fanin_slot(j), Some(0));
        assert!(matches!(dag.make_task(j), TaskBody::Sync(t) if t.name() == "j"));
    }

    #[test]
    fn codecs_default_to_json_and_are_set_per_producer() {
        let dag = Pipeline::new()
            .typed(ty::<String, u32>("a"))
            .typed(ty::<u32, u32>("b"))
            .task(T("c"))
            .edge("a", "b")
            .edge("b", "c")
            .output_codec("a", Codec::Postcard)
            .build()
            .unwrap();
        assert_eq!(dag.source_codec(), Codec::Json);
        assert_eq!(dag.output_codec(0), Codec::Postcard);
        assert_eq!(dag.output_codec(1), Codec::Json);
        assert_eq!(dag.output_codec(crate::msg::NO_TASK), Codec::Json);
        assert_eq!(
            dag.task_types(1),
            Some((std::any::type_name::<u32>(), std::any::type_name::<u32>()))
        );
        assert_eq!(dag.task_types(2), None);
        let dag = pipe(&["a", "b"], &[("a", "b")])
            .codec(Codec::Raw)
            .output_codec("a", Codec::Postcard)
            .build()
            .unwrap();
        assert_eq!(dag.source_codec(), Codec::Raw, "the pipeline's codec");
        assert_eq!(dag.output_codec(0), Codec::Postcard);
        assert_eq!(dag.output_codec(1), Codec::Raw);
    }

    #[test]
    fn every_codec_mismatch_is_reported_at_once_with_tasks_and_types() {
        // Raw source into a typed root; raw "raw" into typed "b"; postcard
        // between String and u32; a typed task with raw outputs; a codec
        // for a task that does not exist.
        let errs = errors(
            Pipeline::new()
                .typed(ty::<String, String>("root"))
                .task(T("raw"))
                .typed(ty::<u32, u32>("b"))
                .typed(ty::<u64, u8>("c"))
                .edge("root", "raw")
                .edge("root", "b")
                .edge("raw", "b")
                .edge("b", "c")
                .codec(Codec::Postcard)
                .source_codec(Codec::Raw)
                .output_codec("raw", Codec::Raw)
                .output_codec("c", Codec::Raw)
                .output_codec("nope", Codec::Json),
        );
        let string = std::any::type_name::<String>().to_string();
        let u32_ = std::any::type_name::<u32>().to_string();
        assert_eq!(
            errs,
            vec![
                PipelineError::UnknownCodecTask("nope".into()),
                PipelineError::RawInput {
                    task: "root".into(),
                    input_type: string.clone(),
                    from: None,
                },
                PipelineError::PostcardTypeMismatch {
                    from: "root".into(),
                    to: "b".into(),
                    out_type: string.clone(),
                    in_type: u32_.clone(),
                },
                PipelineError::RawInput {
                    task: "b".into(),
                    input_type: u32_.clone(),
                    from: Some("raw".into()),
                },
                PipelineError::TypedRawOutput("c".into()),
                PipelineError::PostcardTypeMismatch {
                    from: "b".into(),
                    to: "c".into(),
                    out_type: u32_.clone(),
                    in_type: "u64".into(),
                },
            ]
        );
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(text[0], "output_codec names unknown task \"nope\"");
        assert_eq!(
            text[1],
            format!(
                "typed root task \"root\" reads {string} from the source, whose payloads \
                 are raw bytes; say what they are with source_codec"
            )
        );
        assert_eq!(
            text[2],
            format!(
                "edge \"root\" -> \"b\" is postcard, but \"root\" writes {string} and \
                 \"b\" reads u32; postcard is not self-describing: use one type at both \
                 ends, or JSON on this edge"
            )
        );
        assert_eq!(
            text[3],
            "typed task \"b\" reads u32 from \"raw\", whose outputs are raw bytes; \
             give \"raw\" a codec with output_codec"
        );
        assert_eq!(
            text[4],
            "typed task \"c\" has the raw output codec; a typed task's outputs need a \
             codec (json or postcard)"
        );
    }

    #[test]
    fn json_edges_and_untyped_ends_are_not_type_checked() {
        // JSON between different types (a consumer may read a subset), and
        // postcard where one end is untyped: the pipeline cannot see both
        // types, so it allows them.
        Pipeline::new()
            .typed(ty::<String, String>("a"))
            .typed(ty::<u32, String>("b"))
            .task(T("c"))
            .typed(ty::<u8, u8>("d"))
            .edge("a", "b")
            .edge("b", "c")
            .edge("c", "d")
            .output_codec("b", Codec::Postcard)
            .output_codec("c", Codec::Postcard)
            .build()
            .unwrap();
    }

    #[test]
    fn exports_dot_and_mermaid() {
        let dag = pipe(&["a", "b"], &[("a", "b")]).build().unwrap();
        assert_eq!(
            dag.to_dot("wc"),
            "digraph \"wc\" {\n  rankdir=LR;\n  \"a\" [shape=box];\n  \"b\" [shape=ellipse];\n  \"a\" -> \"b\";\n}\n"
        );
        assert_eq!(
            dag.to_mermaid(),
            "flowchart LR\n  t0[\"a\"]\n  t1[\"b\"]\n  t0 --> t1\n"
        );
    }

    #[test]
    fn edges_group_as_set_and_groupings_need_real_edges_and_agreeing_joins() {
        let dag = pipe(&["a", "b", "c"], &[("a", "b")])
            .edge_by("a", "c", Grouping::All)
            .grouping("a", "b", Grouping::Key)
            .build()
            .unwrap();
        assert_eq!(dag.grouping(0, 1), Grouping::Key);
        assert_eq!(dag.grouping(0, 2), Grouping::All);
        assert_eq!(dag.grouping(1, 2), Grouping::Shuffle, "no such edge");
        assert!(dag.has_keyed_input(1) && !dag.has_keyed_input(2));
        assert!(dag.to_dot("g").contains("\"a\" -> \"b\" [label=\"key\"];"));
        assert!(dag.to_mermaid().contains("t0 -->|all| t2"));

        let errs = errors(pipe(&["a", "b"], &[("a", "b")]).grouping("b", "a", Grouping::Key));
        assert_eq!(
            errs[0].to_string(),
            "a grouping is set on the edge \"b\" -> \"a\", which the pipeline does not have"
        );
        let errs = errors(
            pipe(&["a", "b", "c"], &[("a", "b"), ("a", "c"), ("c", "j")])
                .edge_by("b", "j", Grouping::Key)
                .join(J("j")),
        );
        assert_eq!(
            errs[0].to_string(),
            "the edges into join task \"j\" must group alike: \"c\" -> \"j\" is shuffle, \"b\" -> \"j\" is key"
        );
    }
}
