// Compiled core of agentspec.draft: a depth-limited suffix tree over token sequences, and the scorer
// that merges drafts into one calibrated tree (at the end of this file).
//
// The package's only implementation; tests/reference/suffix_tree.py (PySuffixTree) is its pure-Python
// specification (read its docstring for the invariants), and the parity tests hold this code to the
// same drafts. Nodes live in flat arrays; a node's
// label is seqs[seq][start, start + length). Children are found through one open-addressing
// hash table keyed by (parent, first token) and enumerated through a doubly linked list kept in
// count order (except under the root).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <queue>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int32_t ROOT = 0;
constexpr int32_t NONE = -1;

struct Node {
    int32_t count = 0;        // suffixes reaching this edge = sum(children counts) + suffixes ending here
    int32_t parent = NONE;
    int32_t seq = NONE;       // label = seqs[seq][start, start + length)
    int32_t start = 0;
    int32_t length = 0;
    int32_t token = NONE;     // first token of the label (the key in the parent's child index)
    int32_t first = NONE;     // children, highest count first (unordered under the root)
    int32_t last = NONE;
    int32_t next = NONE;      // siblings
    int32_t prev = NONE;
};

// (parent, token) -> child, linear probing, backward-shift deletion.
class ChildIndex {
  public:
    ChildIndex() { clear(); }
    int32_t get(int32_t parent, int32_t token) const {
        uint64_t key = make_key(parent, token);
        for (size_t i = slot(key);; i = (i + 1) & mask_) {
            if (slots_[i].key == EMPTY) return NONE;
            if (slots_[i].key == key) return slots_[i].val;
        }
    }
    void put(int32_t parent, int32_t token, int32_t child) {
        if ((size_ + 1) * 5 > slots_.size() * 4) rehash(slots_.size() * 2);
        uint64_t key = make_key(parent, token);
        size_t i = slot(key);
        for (; slots_[i].key != EMPTY; i = (i + 1) & mask_) {
            if (slots_[i].key == key) { slots_[i].val = child; return; }
        }
        slots_[i].key = key;
        slots_[i].val = child;
        ++size_;
    }
    void erase(int32_t parent, int32_t token) {
        uint64_t key = make_key(parent, token);
        size_t i = slot(key);
        for (; slots_[i].key != key; i = (i + 1) & mask_) {
            if (slots_[i].key == EMPTY) return;
        }
        size_t j = i;
        while (true) {
            j = (j + 1) & mask_;
            if (slots_[j].key == EMPTY) break;
            size_t home = slot(slots_[j].key);
            // move slots_[j].key back to the hole at i unless its home lies cyclically in (i, j]
            bool in_range = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
            if (!in_range) {
                slots_[i].key = slots_[j].key;
                slots_[i].val = slots_[j].val;
                i = j;
            }
        }
        slots_[i].key = EMPTY;
        --size_;
    }
    void reserve(size_t entries) {  // capacity for ``entries`` without growing past the load limit
        size_t capacity = slots_.size();
        while (entries * 5 > capacity * 4) capacity *= 2;
        if (capacity != slots_.size()) rehash(capacity);
    }
    void clear() {
        slots_.assign(1024, Slot{EMPTY, NONE});
        mask_ = 1023;
        size_ = 0;
    }
    size_t size() const { return size_; }
    size_t bytes() const { return slots_.capacity() * sizeof(Slot); }

  private:
    static constexpr uint64_t EMPTY = ~0ull;
    static uint64_t make_key(int32_t parent, int32_t token) {
        return (static_cast<uint64_t>(static_cast<uint32_t>(parent)) << 32) | static_cast<uint32_t>(token);
    }
    size_t slot(uint64_t key) const {
        key ^= key >> 33;
        key *= 0xff51afd7ed558ccdull;
        key ^= key >> 33;
        key *= 0xc4ceb9fe1a85ec53ull;
        key ^= key >> 33;
        return static_cast<size_t>(key) & mask_;
    }
    void rehash(size_t capacity) {
        std::vector<Slot> old(capacity, Slot{EMPTY, NONE});
        old.swap(slots_);
        mask_ = capacity - 1;
        size_ = 0;
        for (size_t i = 0; i < old.size(); ++i) {
            if (old[i].key == EMPTY) continue;
            size_t j = slot(old[i].key);
            while (slots_[j].key != EMPTY) j = (j + 1) & mask_;
            slots_[j].key = old[i].key;
            slots_[j].val = old[i].val;
            ++size_;
        }
    }
#pragma pack(push, 4)
    struct Slot {  // key and value side by side: one cache miss per probe (12 bytes, packed)
        uint64_t key;
        int32_t val;
    };
#pragma pack(pop)
    std::vector<Slot> slots_;
    size_t mask_ = 0;
    size_t size_ = 0;
};

// Nodes in fixed-size blocks: ids are stable, growth never copies, slack is under one block.
class NodePool {
  public:
    static constexpr int SHIFT = 14;
    static constexpr size_t BLOCK = size_t(1) << SHIFT;
    Node& operator[](int32_t i) { return blocks_[i >> SHIFT][i & (BLOCK - 1)]; }
    const Node& operator[](int32_t i) const { return blocks_[i >> SHIFT][i & (BLOCK - 1)]; }
    size_t size() const { return size_; }
    void push_back(const Node& nd) {
        if ((size_ >> SHIFT) == blocks_.size()) blocks_.emplace_back(new Node[BLOCK]);
        (*this)[static_cast<int32_t>(size_)] = nd;
        ++size_;
    }
    void reset() {
        blocks_.clear();
        size_ = 0;
        push_back(Node());
    }
    size_t bytes() const { return blocks_.size() * BLOCK * sizeof(Node); }

  private:
    std::vector<std::unique_ptr<Node[]>> blocks_;
    size_t size_ = 0;
};

// The nodes where the live suffixes of one sequence end, oldest first (at most max_depth).
class ActiveRing {
  public:
    explicit ActiveRing(int capacity) : buf_(capacity, ROOT) {}
    size_t size() const { return size_; }
    int32_t& operator[](size_t i) {
        size_t j = head_ + i;
        return buf_[j >= buf_.size() ? j - buf_.size() : j];
    }
    void push_root() {  // add the new empty suffix; drop the oldest one when full
        if (size_ == buf_.size()) {
            buf_[head_] = ROOT;
            head_ = head_ + 1 == buf_.size() ? 0 : head_ + 1;
        } else {
            (*this)[size_++] = ROOT;
        }
    }

  private:
    std::vector<int32_t> buf_;
    size_t head_ = 0, size_ = 0;
};

struct Draft {
    std::vector<int32_t> tokens;
    std::vector<int32_t> parents;
    std::vector<double> probs;
    std::vector<int32_t> supports;  // occurrences of the context + path before each node
    double score = 0.0;
    int match_len = 0;
};

struct Candidate {
    double prob;
    int64_t order;
    int32_t token, node, off, parent, support;
};

struct CandidateLess {  // priority_queue pops the highest prob, then the lowest order
    bool operator()(const Candidate& a, const Candidate& b) const {
        if (a.prob != b.prob) return a.prob < b.prob;
        return a.order > b.order;
    }
};

struct Sequence {
    int64_t id;
    std::vector<int32_t> tokens;
    ActiveRing active;  // nodes where this sequence's live suffixes end
};

class SuffixTree {
  public:
    explicit SuffixTree(int max_depth) : max_depth_(max_depth) {
        if (max_depth < 1) throw std::invalid_argument("max_depth must be >= 1, got " + std::to_string(max_depth));
        reset_nodes();
    }

    void extend(int64_t seq_id, const std::vector<int32_t>& tokens) {
        int32_t s = seq_index(seq_id);
        seqs_[s].tokens.reserve(seqs_[s].tokens.size() + tokens.size());
        for (int32_t tok : tokens) append_internal(s, tok);
    }

    void append(int64_t seq_id, int32_t token) { append_internal(seq_index(seq_id), token); }

    int64_t num_tokens() const {
        int64_t n = 0;
        for (const auto& s : seqs_) n += static_cast<int64_t>(s.tokens.size());
        return n;
    }
    int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
    int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size()); }

    std::vector<int64_t> seq_ids() const {
        std::vector<int64_t> out;
        for (const auto& s : seqs_) out.push_back(s.id);
        return out;
    }

    std::vector<int32_t> get_sequence(int64_t seq_id) const {
        auto it = ids_.find(seq_id);
        if (it == ids_.end()) throw py::key_error("no sequence " + std::to_string(seq_id) + " in this tree");
        return seqs_[it->second].tokens;
    }

    void remove(int64_t seq_id) {
        auto it = ids_.find(seq_id);
        if (it == ids_.end()) throw py::key_error("no sequence " + std::to_string(seq_id) + " in this tree");
        seqs_.erase(seqs_.begin() + it->second);
        rebuild();
    }

    int evict(int64_t max_tokens) {
        int64_t total = num_tokens();
        size_t dropped = 0;
        while (dropped < seqs_.size() && total > max_tokens) total -= seqs_[dropped++].tokens.size();
        if (dropped) {
            seqs_.erase(seqs_.begin(), seqs_.begin() + dropped);
            rebuild();
        }
        return static_cast<int>(dropped);
    }

    void rebuild() {
        std::vector<Sequence> old;
        old.swap(seqs_);
        reset_nodes();
        size_t total = 0;
        for (const auto& s : old) total += s.tokens.size();
        index_.reserve(total + total / 2);  // about 1.5 nodes per token on agent text
        for (auto& s : old) {
            int32_t idx = seq_index(s.id);
            seqs_[idx].tokens.reserve(s.tokens.size());
            for (int32_t tok : s.tokens) append_internal(idx, tok);
        }
    }

    Draft speculate(const std::vector<int32_t>& full_context, int budget, double alpha, double beta,
                    double min_prob) const {
        size_t n = full_context.size() > static_cast<size_t>(max_depth_) ? max_depth_ : full_context.size();
        const int32_t* context = full_context.data() + (full_context.size() - n);
        Draft best;
        for (size_t p = 1; p <= n; ++p) {
            int32_t node = ROOT, off = 0;
            bool ok = true;
            for (size_t i = n - p; i < n; ++i) {
                int32_t tok = context[i];
                const Node& nd = nodes_[node];
                if (off == nd.length) {
                    node = find_child(node, tok);
                    if (node == NONE) { ok = false; break; }
                    off = 1;
                } else {
                    if (seqs_[nd.seq].tokens[nd.start + off] != tok) { ok = false; break; }
                    ++off;
                }
            }
            if (!ok) break;
            const Node& at = nodes_[node];
            // a single occurrence with nothing after it: longer matches are that same occurrence
            if (at.count == 1 && off == at.length && at.first == NONE) break;
            int limit = static_cast<int>(alpha * static_cast<double>(p) + beta);
            if (budget < limit) limit = budget;
            if (limit <= 0) continue;
            Draft draft = grow(node, off, limit, min_prob);
            if (draft.score > 0 && draft.score >= best.score) {  // ties: the longer match
                draft.match_len = static_cast<int>(p);
                best = std::move(draft);
            }
        }
        return best;
    }

    void check_integrity() const {
        std::vector<int64_t> expected(nodes_.size(), 0), ends(nodes_.size(), 0);
        for (const auto& sq : seqs_) {
            const auto& seq = sq.tokens;
            for (size_t s = 0; s < seq.size(); ++s) {
                expected[ROOT] += 1;
                size_t end = std::min(seq.size(), s + static_cast<size_t>(max_depth_));
                int32_t node = ROOT, off = 0;
                for (size_t i = s; i < end; ++i) {
                    const Node& nd = nodes_[node];
                    if (off == nd.length) {
                        node = index_.get(node, seq[i]);
                        if (node == NONE) fail("suffix at " + std::to_string(s) + " of a sequence is missing");
                        expected[node] += 1;
                        off = 1;
                    } else if (seqs_[nd.seq].tokens[nd.start + off] != seq[i]) {
                        fail("label mismatch at node " + std::to_string(node));
                    } else {
                        ++off;
                    }
                }
                if (off != nodes_[node].length) fail("a suffix ends inside the label of node " + std::to_string(node));
                ends[node] += 1;
            }
        }
        for (size_t node = 0; node < nodes_.size(); ++node) {
            const Node& nd = nodes_[static_cast<int32_t>(node)];
            if (nd.count != expected[node]) fail("node " + std::to_string(node) + " has a wrong count");
            int64_t kids = 0;
            int32_t child = nd.first, prev = NONE;
            while (child != NONE) {
                const Node& c = nodes_[child];
                if (c.parent != static_cast<int32_t>(node) || c.prev != prev) fail("broken child list");
                if (index_.get(static_cast<int32_t>(node), c.token) != child) fail("child not indexed");
                if (node != ROOT && prev != NONE && nodes_[prev].count < c.count) fail("children not ordered");
                kids += c.count;
                prev = child;
                child = c.next;
            }
            if (nd.last != prev) fail("wrong last child");
            if (node != ROOT && kids + ends[node] != nd.count) fail("children counts + ends != count");
        }
        if (index_.size() != nodes_.size() - 1) fail("child index size does not match the nodes");
    }

    int64_t estimate_memory() const {
        int64_t bytes = static_cast<int64_t>(nodes_.bytes() + index_.bytes());
        for (const auto& s : seqs_) bytes += s.tokens.capacity() * sizeof(int32_t) + sizeof(Sequence) + 64;
        return bytes;
    }

    int max_depth() const { return max_depth_; }

  private:
    [[noreturn]] static void fail(const std::string& msg) { throw py::value_error(msg); }

    void reset_nodes() {
        nodes_.reset();
        index_.clear();
        ids_.clear();
        for (size_t i = 0; i < seqs_.size(); ++i) ids_[seqs_[i].id] = static_cast<int32_t>(i);
    }

    int32_t seq_index(int64_t seq_id) {
        auto it = ids_.find(seq_id);
        if (it != ids_.end()) return it->second;
        int32_t idx = static_cast<int32_t>(seqs_.size());
        seqs_.push_back(Sequence{seq_id, {}, ActiveRing(max_depth_)});
        ids_[seq_id] = idx;
        return idx;
    }

    // Child of ``node`` whose label starts with ``token``: the first (most frequent) child and
    // single-child nodes are checked directly; the hash index only serves wider nodes.
    int32_t find_child(int32_t node, int32_t token) const {
        const Node& nd = nodes_[node];
        if (nd.first == NONE) return NONE;
        if (node != ROOT) {
            if (nodes_[nd.first].token == token) return nd.first;
            if (nd.first == nd.last) return NONE;
        }
        return index_.get(node, token);
    }

    int32_t new_node(int32_t count, int32_t parent, int32_t seq, int32_t start, int32_t length, int32_t token) {
        Node nd;
        nd.count = count; nd.parent = parent; nd.seq = seq; nd.start = start; nd.length = length; nd.token = token;
        nodes_.push_back(nd);
        return static_cast<int32_t>(nodes_.size() - 1);
    }

    void link_last(int32_t parent, int32_t node) {
        int32_t last = nodes_[parent].last;
        nodes_[node].prev = last;
        nodes_[node].next = NONE;
        if (last == NONE) nodes_[parent].first = node; else nodes_[last].next = node;
        nodes_[parent].last = node;
    }

    void replace_child(int32_t parent, int32_t old, int32_t nw) {
        int32_t prev = nodes_[old].prev, nxt = nodes_[old].next;
        nodes_[nw].prev = prev;
        nodes_[nw].next = nxt;
        if (prev == NONE) nodes_[parent].first = nw; else nodes_[prev].next = nw;
        if (nxt == NONE) nodes_[parent].last = nw; else nodes_[nxt].prev = nw;
        nodes_[old].prev = nodes_[old].next = NONE;
    }

    void bubble_up(int32_t node) {
        int32_t parent = nodes_[node].parent;
        if (parent == ROOT) return;
        int32_t prev = nodes_[node].prev;
        while (prev != NONE && nodes_[prev].count < nodes_[node].count) {
            int32_t pp = nodes_[prev].prev, nn = nodes_[node].next;
            if (pp == NONE) nodes_[parent].first = node; else nodes_[pp].next = node;
            if (nn == NONE) nodes_[parent].last = prev; else nodes_[nn].prev = prev;
            nodes_[node].prev = pp; nodes_[node].next = prev;
            nodes_[prev].prev = node; nodes_[prev].next = nn;
            prev = pp;
        }
    }

    void append_internal(int32_t s, int32_t token) {
        Sequence& sq = seqs_[s];
        sq.tokens.push_back(token);
        const int32_t n = static_cast<int32_t>(sq.tokens.size());
        sq.active.push_root();
        nodes_[ROOT].count += 1;
        for (size_t i = 0; i < sq.active.size(); ++i) {
            int32_t node = sq.active[i];
            int32_t child = find_child(node, token);
            if (child == NONE) {
                if (node != ROOT && nodes_[node].count == 1) {
                    Node& nd = nodes_[node];
                    nd.length += 1;
                    nd.seq = s;
                    nd.start = n - nd.length;
                } else {
                    int32_t leaf = new_node(1, node, s, n - 1, 1, token);
                    index_.put(node, token, leaf);
                    link_last(node, leaf);
                    sq.active[i] = leaf;
                }
            } else if (node != ROOT && nodes_[node].count == nodes_[child].count + 1 && nodes_[child].length > 1) {
                Node& nd = nodes_[node];
                nd.length += 1;
                nd.seq = s;
                nd.start = n - nd.length;
                index_.erase(node, token);
                Node& c = nodes_[child];
                c.start += 1;
                c.length -= 1;
                c.token = seqs_[c.seq].tokens[c.start];
                index_.put(node, c.token, child);
            } else if (nodes_[child].length == 1) {
                nodes_[child].count += 1;
                bubble_up(child);
                sq.active[i] = child;
            } else {
                const Node c0 = nodes_[child];
                int32_t mid = new_node(c0.count + 1, node, c0.seq, c0.start, 1, token);
                index_.put(node, token, mid);
                replace_child(node, child, mid);
                Node& c = nodes_[child];
                c.parent = mid;
                c.start += 1;
                c.length -= 1;
                c.token = seqs_[c.seq].tokens[c.start];
                index_.put(mid, c.token, child);
                nodes_[mid].first = child;
                nodes_[mid].last = child;
                bubble_up(mid);
                sq.active[i] = mid;
            }
        }
    }

    Draft grow(int32_t node, int32_t off, int limit, double min_prob) const {
        Draft draft;
        std::priority_queue<Candidate, std::vector<Candidate>, CandidateLess> heap;
        int64_t order = 0;
        auto expand = [&](int32_t nd_id, int32_t of, double prob, int32_t parent) {
            const Node& nd = nodes_[nd_id];
            if (of < nd.length) {
                heap.push(Candidate{prob, order++, seqs_[nd.seq].tokens[nd.start + of], nd_id, of + 1, parent,
                                    nd.count});
                return;
            }
            double denom = static_cast<double>(nd.count);
            for (int32_t child = nd.first; child != NONE; child = nodes_[child].next) {
                double pr = prob * static_cast<double>(nodes_[child].count) / denom;
                if (pr < min_prob) break;
                heap.push(Candidate{pr, order++, nodes_[child].token, child, 1, parent, nd.count});
            }
        };
        expand(node, off, 1.0, -1);
        while (!heap.empty() && static_cast<int>(draft.tokens.size()) < limit) {
            Candidate c = heap.top();
            heap.pop();
            draft.tokens.push_back(c.token);
            draft.parents.push_back(c.parent);
            draft.probs.push_back(c.prob);
            draft.supports.push_back(c.support);
            draft.score += c.prob;
            expand(c.node, c.off, c.prob, static_cast<int32_t>(draft.tokens.size()) - 1);
        }
        return draft;
    }

    int max_depth_;
    NodePool nodes_;
    ChildIndex index_;
    std::vector<Sequence> seqs_;  // oldest first
    std::unordered_map<int64_t, int32_t> ids_;
};


// ---------------------------------------------------------------------------------------------
// Scorer: the merge of the sources' drafts and the online acceptance model. Same computation,
// operation for operation, as PyScorer and AcceptanceCalibrator in tests/reference/scoring.py (the
// specification; read their docstrings).

constexpr int NUM_FEATURES = 9;  // token, previous, depth, rank, match, support, agree, conflict, state
constexpr int SHARED_FEATURES = 2;
constexpr int NUM_CROSSES = 3;      // token x depth and token x match (shared), token x source
constexpr int CROSS_STRIDE = 8;     // a cross of the token with a small feature: token * 8 + min(value, cap <= 7)
constexpr int CROSS_MAX_DEPTH = 3;  // token x depth tells depth 0, 1, 2 and 3+ apart
constexpr int NUM_BINS = 10;
constexpr int MATCH_EDGES[] = {2, 4, 8, 16, 32};
constexpr int SUPPORT_EDGES[] = {2, 3, 5, 9, 17};
constexpr int MAX_DEPTH_FEATURE = 7;
constexpr int MAX_RANK_FEATURE = 2;

template <size_t N>
int bucket(const int (&edges)[N], int v) {  // bisect_right(edges, v)
    int b = 0;
    while (b < static_cast<int>(N) && edges[b] <= v) ++b;
    return b;
}

struct Feature {  // (source, estimate, *features) of one proposal of a node
    int32_t source = 0;
    double prob = 0.0;
    int32_t f[NUM_FEATURES] = {};
};

struct Proposal {
    std::vector<int32_t> tokens, parents, sources;
    std::vector<double> probs;
    std::vector<Feature> features;
};

class Scorer {
  public:
    Scorer(bool calibrate, double learning_rate, double max_sq_grad)
        : calibrate_(calibrate), lr_(learning_rate), cap_(max_sq_grad) {}

    double predict(int32_t source, double prob, const int32_t* f, int nf) const {
        uint64_t keys[3 + NUM_FEATURES + NUM_CROSSES];
        int n = make_keys(source, prob, f, nf, keys);
        return sigmoid(z(keys, n, logit(prob)));
    }

    void update(int32_t source, double prob, const int32_t* f, int nf, bool accepted) {
        uint64_t keys[3 + NUM_FEATURES + NUM_CROSSES];
        int n = make_keys(source, prob, f, nf, keys);
        double lp = logit(prob);
        double g = sigmoid(z(keys, n, lp)) - (accepted ? 1.0 : 0.0);
        for (int j = 0; j < n; ++j) {
            double grad = j == 0 ? g * lp : g;
            auto it = params_.find(keys[j]);
            if (it == params_.end()) it = params_.emplace(keys[j], Param{j == 0 ? 1.0 : 0.0, 0.01}).first;
            double acc = it->second.sq + grad * grad;
            if (acc > cap_) acc = cap_;
            it->second.sq = acc;
            it->second.w = it->second.w - lr_ * grad / std::sqrt(acc);
        }
        ++updates_;
        if (accepted) ++accepted_;
    }

    Proposal merge(const std::vector<std::pair<int32_t, const Draft*>>& drafts, int budget, int32_t state,
                   int32_t last_token) const {
        struct Option {
            int32_t source;
            double prob;
            int32_t f[6];  // token, previous, depth, rank, match, support
        };
        Proposal out;
        std::vector<std::vector<Option>> options;
        std::unordered_map<uint64_t, int32_t> index;
        std::unordered_map<int32_t, uint32_t> proposing;  // parent -> bit set of the sources proposing there
        index.reserve(64);
        for (const auto& [source, d] : drafts) {
            const size_t n = d->tokens.size();
            std::vector<int32_t> local(n), depth(n), kids(n + 1, 0);
            for (size_t i = 0; i < n; ++i) {
                int32_t tok = d->tokens[i], par = d->parents[i];
                int32_t rank = kids[par + 1]++;
                int32_t mp, dep;
                double r;
                if (par >= 0) {
                    mp = local[par];
                    dep = depth[par] + 1;
                    r = d->probs[i] / d->probs[par];
                } else {
                    mp = -1;
                    dep = 0;
                    r = d->probs[i];
                }
                depth[i] = dep;
                uint64_t key = pair_key(mp, tok);
                auto it = index.find(key);
                int32_t j;
                if (it == index.end()) {
                    j = static_cast<int32_t>(out.tokens.size());
                    index.emplace(key, j);
                    out.tokens.push_back(tok);
                    out.parents.push_back(mp);
                    options.emplace_back();
                } else {
                    j = it->second;
                }
                proposing[mp] |= 1u << source;
                int b = static_cast<int>(r * 10);
                if (b > NUM_BINS - 1) b = NUM_BINS - 1;
                int md = d->match_len + dep;
                Option o{source, (b + 0.5) / 10, {tok, mp >= 0 ? out.tokens[mp] : last_token,
                         std::min(dep, MAX_DEPTH_FEATURE), std::min(rank, MAX_RANK_FEATURE),
                         bucket(MATCH_EDGES, std::min(md, MATCH_EDGES[4])),
                         bucket(SUPPORT_EDGES, std::min(d->supports[i], SUPPORT_EDGES[4]))}};
                options[j].push_back(o);
                local[i] = j;
            }
        }
        const bool multi = drafts.size() > 1;
        const size_t total = out.tokens.size();
        out.probs.reserve(total);
        out.sources.reserve(total);
        out.features.reserve(total);
        int32_t agree = 1, conflict = 0;
        for (size_t j = 0; j < total; ++j) {
            const auto& opts = options[j];
            int32_t p = out.parents[j];
            if (multi) {
                agree = static_cast<int32_t>(opts.size());
                conflict = __builtin_popcount(proposing[p]) > agree ? 1 : 0;
            }
            double q = -1.0;
            Feature best;
            for (const auto& o : opts) {
                Feature f;
                f.source = o.source;
                f.prob = o.prob;
                std::copy(o.f, o.f + 6, f.f);
                f.f[6] = agree;
                f.f[7] = conflict;
                f.f[8] = state;
                double qf = calibrate_ ? predict(f.source, f.prob, f.f, NUM_FEATURES) : f.prob;
                if (qf > q) {
                    q = qf;
                    best = f;
                }
            }
            out.probs.push_back((q < 1.0 ? q : 1.0) * (p >= 0 ? out.probs[p] : 1.0));
            out.sources.push_back(best.source);
            out.features.push_back(best);
        }
        if (total > static_cast<size_t>(budget)) {
            std::vector<int32_t> keep(total);
            for (size_t i = 0; i < total; ++i) keep[i] = static_cast<int32_t>(i);
            std::stable_sort(keep.begin(), keep.end(),
                             [&](int32_t a, int32_t b) { return out.probs[a] > out.probs[b]; });
            keep.resize(budget > 0 ? budget : 0);
            std::sort(keep.begin(), keep.end());
            std::vector<int32_t> new_index(total, -1);
            for (size_t i = 0; i < keep.size(); ++i) new_index[keep[i]] = static_cast<int32_t>(i);
            Proposal kept;
            for (int32_t i : keep) {
                kept.tokens.push_back(out.tokens[i]);
                kept.parents.push_back(out.parents[i] < 0 ? -1 : new_index[out.parents[i]]);
                kept.probs.push_back(out.probs[i]);
                kept.sources.push_back(out.sources[i]);
                kept.features.push_back(out.features[i]);
            }
            return kept;
        }
        return out;
    }

    void learn(const Proposal& proposal, const std::vector<int32_t>& tokens, const std::vector<int32_t>& parents,
               const std::vector<int32_t>& accepted) {
        if (!calibrate_ || proposal.features.empty()) return;
        if (tokens.size() != parents.size()) throw std::invalid_argument("tokens and parents differ in length");
        std::unordered_map<uint64_t, int32_t> where;
        where.reserve(proposal.tokens.size() * 2);
        for (size_t i = 0; i < proposal.tokens.size(); ++i)
            where.emplace(pair_key(proposal.parents[i], proposal.tokens[i]), static_cast<int32_t>(i));
        const size_t n = tokens.size();
        std::vector<char> ok(n, 0);
        for (int32_t a : accepted)
            if (a >= 0 && static_cast<size_t>(a) < n) ok[a] = 1;
        std::vector<int32_t> mapped(n, -2);
        for (size_t i = 0; i < n; ++i) {
            int32_t p = parents[i];
            if (p >= static_cast<int32_t>(i)) throw std::invalid_argument("parents must precede their children");
            if (p >= 0 && !ok[p]) continue;  // the parent was rejected: this node was never tested
            auto it = where.find(pair_key(p < 0 ? -1 : mapped[p], tokens[i]));
            if (it == where.end()) continue;
            if (ok[i]) mapped[i] = it->second;
            const Feature& f = proposal.features[it->second];
            update(f.source, f.prob, f.f, NUM_FEATURES, ok[i] != 0);
        }
    }

    int64_t updates() const { return updates_; }
    int64_t accepted() const { return accepted_; }

  private:
    struct Param {
        double w, sq;
    };

    static uint64_t pair_key(int32_t parent, int32_t token) {
        return (static_cast<uint64_t>(static_cast<uint32_t>(parent)) << 32) | static_cast<uint32_t>(token);
    }
    // (group, source or -1, value) -> one integer: group 0 = slope, 1 = bias, 2 = bin, 3 + i = feature i
    static uint64_t weight_key(int group, int32_t source, int32_t value) {
        return (static_cast<uint64_t>(group) << 56) | (static_cast<uint64_t>(static_cast<uint8_t>(source + 1)) << 48) |
               static_cast<uint32_t>(value);
    }
    static int make_keys(int32_t source, double prob, const int32_t* f, int nf, uint64_t* keys) {
        int b = static_cast<int>(prob * NUM_BINS);
        b = std::min(std::max(b, 0), NUM_BINS - 1);
        keys[0] = weight_key(0, source, 0);
        keys[1] = weight_key(1, source, 0);
        keys[2] = weight_key(2, source, b);
        if (nf > NUM_FEATURES) nf = NUM_FEATURES;
        for (int i = 0; i < nf; ++i) keys[3 + i] = weight_key(3 + i, i < SHARED_FEATURES ? -1 : source, f[i]);
        if (nf < 5) return 3 + nf;  // the crosses need token, depth and match
        keys[3 + nf] = weight_key(3 + NUM_FEATURES, -1, f[0] * CROSS_STRIDE + std::min(f[2], CROSS_MAX_DEPTH));
        keys[4 + nf] = weight_key(4 + NUM_FEATURES, source, f[0]);
        keys[5 + nf] = weight_key(5 + NUM_FEATURES, -1, f[0] * CROSS_STRIDE + std::min(f[4], CROSS_STRIDE - 1));
        return 6 + nf;
    }
    static double logit(double prob) {
        double p = std::min(std::max(prob, 1e-3), 1.0 - 1e-3);
        return std::log(p / (1.0 - p));
    }
    static double sigmoid(double z) { return z < -700.0 ? 0.0 : 1.0 / (1.0 + std::exp(-z)); }
    double z(const uint64_t* keys, int n, double lp) const {
        auto it = params_.find(keys[0]);
        double z = (it == params_.end() ? 1.0 : it->second.w) * lp;
        for (int j = 1; j < n; ++j) {
            it = params_.find(keys[j]);
            if (it != params_.end()) z += it->second.w;
        }
        return z;
    }

    bool calibrate_;
    double lr_, cap_;
    std::unordered_map<uint64_t, Param> params_;
    int64_t updates_ = 0, accepted_ = 0;
};

}  // namespace

PYBIND11_MODULE(_suffix_core, m) {
    m.doc() = "Compiled core of agentspec.draft: the suffix tree and the scorer (spec: tests/reference/).";
    py::class_<Draft>(m, "Draft")
        .def(py::init<>())
        .def_readonly("tokens", &Draft::tokens)
        .def_readonly("parents", &Draft::parents)
        .def_readonly("probs", &Draft::probs)
        .def_readonly("supports", &Draft::supports)
        .def_readonly("score", &Draft::score)
        .def_readonly("match_len", &Draft::match_len)
        .def("__repr__", [](const Draft& d) {
            return "Draft(tokens=" + py::repr(py::cast(d.tokens)).cast<std::string>() + ", score=" +
                   std::to_string(d.score) + ", match_len=" + std::to_string(d.match_len) + ")";
        });
    py::class_<SuffixTree>(m, "SuffixTree")
        .def(py::init<int>(), py::arg("max_depth") = 64)
        .def("extend", &SuffixTree::extend, py::arg("seq_id"), py::arg("tokens"))
        .def("append", &SuffixTree::append, py::arg("seq_id"), py::arg("token"))
        .def(
            "speculate",
            [](const SuffixTree& tree, const py::sequence& context, int budget, double alpha, double beta,
               double min_prob) {
                size_t n = py::len(context), d = static_cast<size_t>(tree.max_depth());
                std::vector<int32_t> tail;
                tail.reserve(n < d ? n : d);
                for (size_t i = n > d ? n - d : 0; i < n; ++i) tail.push_back(context[i].cast<int32_t>());
                py::gil_scoped_release release;
                return tree.speculate(tail, budget, alpha, beta, min_prob);
            },
            py::arg("context"), py::arg("budget"), py::arg("alpha") = 1.0, py::arg("beta") = 0.0,
            py::arg("min_prob") = 0.1)
        .def("seq_ids", &SuffixTree::seq_ids)
        .def("get_sequence", &SuffixTree::get_sequence, py::arg("seq_id"))
        .def("remove", &SuffixTree::remove, py::arg("seq_id"))
        .def("evict", &SuffixTree::evict, py::arg("max_tokens"))
        .def("rebuild", &SuffixTree::rebuild)
        .def("check_integrity", &SuffixTree::check_integrity)
        .def("estimate_memory", &SuffixTree::estimate_memory)
        .def_property_readonly("num_tokens", &SuffixTree::num_tokens)
        .def_property_readonly("num_sequences", &SuffixTree::num_sequences)
        .def_property_readonly("num_nodes", &SuffixTree::num_nodes)
        .def_property_readonly("max_depth", &SuffixTree::max_depth);
    py::class_<Proposal>(m, "Proposal")
        .def_readonly("tokens", &Proposal::tokens)
        .def_readonly("parents", &Proposal::parents)
        .def_readonly("probs", &Proposal::probs)
        .def_readonly("sources", &Proposal::sources)
        .def_property_readonly("features", [](const Proposal& p) {
            py::list out;
            for (const auto& f : p.features) {
                py::tuple t(2 + NUM_FEATURES);
                t[0] = f.source;
                t[1] = f.prob;
                for (int i = 0; i < NUM_FEATURES; ++i) t[2 + i] = f.f[i];
                out.append(t);
            }
            return out;
        });
    py::class_<Scorer>(m, "Scorer")
        .def(py::init<bool, double, double>(), py::arg("calibrate") = true, py::arg("learning_rate") = 0.1,
             py::arg("max_sq_grad") = 100.0)
        .def(
            "merge",
            [](const Scorer& scorer, const py::list& drafts, int budget, int32_t state, int32_t last_token) {
                std::vector<std::pair<int32_t, const Draft*>> items;
                items.reserve(drafts.size());
                for (const auto& item : drafts) {
                    auto pair = item.cast<py::tuple>();
                    int32_t source = pair[0].cast<int32_t>();
                    if (source < 0 || source > 31) throw py::value_error("source must be in [0, 31]");
                    items.emplace_back(source, pair[1].cast<const Draft*>());
                }
                return scorer.merge(items, budget, state, last_token);
            },
            py::arg("drafts"), py::arg("budget"), py::arg("state"), py::arg("last_token"))
        .def("learn", &Scorer::learn, py::arg("proposal"), py::arg("tokens"), py::arg("parents"), py::arg("accepted"))
        .def(
            "predict",
            [](const Scorer& scorer, int32_t source, double prob, const std::vector<int32_t>& features) {
                return scorer.predict(source, prob, features.data(), static_cast<int>(features.size()));
            },
            py::arg("source"), py::arg("prob"), py::arg("features") = std::vector<int32_t>())
        .def(
            "update",
            [](Scorer& scorer, int32_t source, double prob, const std::vector<int32_t>& features, bool accepted) {
                scorer.update(source, prob, features.data(), static_cast<int>(features.size()), accepted);
            },
            py::arg("source"), py::arg("prob"), py::arg("features"), py::arg("accepted"))
        .def_property_readonly("updates", &Scorer::updates)
        .def_property_readonly("accepted", &Scorer::accepted);
}
