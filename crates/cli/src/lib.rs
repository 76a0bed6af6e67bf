//! # dynseg-cli: the `dynseg` command line
//!
//! The binary (`main.rs`) reads the command and calls into these modules; they
//! are a library so end-to-end tests can start the dev cluster and generate the
//! demo's traffic in-process.
//!
//! | module | what it holds |
//! |---|---|
//! | [`dev`] | the whole cluster in one process |
//! | [`demo`] | the demo: segments, generated traffic, the live view |
//! | [`commands`] | segment, ingest, tail, user, members, clock |
//! | [`cluster`] | cluster status, add-node, drain, remove, rebalance |
//! | [`insight`] | segment overlap |
//! | [`bench`] | the load generator |
//! | [`traffic`] | the generated traffic of the demo and the load generator |
//! | [`event_json`], [`segments_file`] | input files: Segment-shaped events, segment lists |
//! | [`args`], [`output`], [`error`] | flags, tables and JSON, exit codes |

pub mod args;
pub mod bench;
pub mod cluster;
pub mod commands;
pub mod demo;
pub mod dev;
pub mod error;
pub mod event_json;
pub mod insight;
pub mod output;
pub mod segments_file;
pub mod traffic;
