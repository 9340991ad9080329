// The server allocates per request (HTTP/2 frames, entities, responses, audit records) and
// per policy at load: mimalloc serves both faster than glibc's malloc (README, "The allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    agentca::cli::run()
}
