//! `sqlx::migrate!` embeds the migrations at compile time, but cargo only knows to rebuild
//! this crate when its own sources change; without this, a new migration file would be
//! left out of binaries built from a warm target directory.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
