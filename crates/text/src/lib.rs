//! Markdown splitting and rendering.
//!
//! Agents reply in CommonMark. Every platform caps the length of one message
//! and counts that length differently, so an egress has to cut a long reply
//! into several messages without breaking its structure:
//! [`split_markdown`] does that for a [`Limit`]. [`render_html`] turns a reply
//! into HTML that is safe to put into a web page.

#![warn(missing_docs)]

mod html;
mod measure;
mod split;
pub mod telegram;

pub use html::render_html;
pub use measure::{Limit, Measure};
pub use split::split_markdown;

/// The Markdown extensions understood by both the splitter and the renderer.
fn options() -> pulldown_cmark::Options {
    use pulldown_cmark::Options;
    Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS
}
