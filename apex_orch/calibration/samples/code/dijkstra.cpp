// Shortest paths on a weighted directed graph with Dijkstra's algorithm,
// plus path reconstruction. Reads "from to weight" lines from stdin.
//
//   echo -e "A B 4\nA C 1\nC B 2\nB D 1\nC D 5" | ./dijkstra A D
//   A -> C -> B -> D (cost 4)
#include <iostream>
#include <limits>
#include <optional>
#include <queue>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

class Graph {
public:
    int node(const std::string& name) {
        auto [it, inserted] = index_.try_emplace(name, static_cast<int>(names_.size()));
        if (inserted) {
            names_.push_back(name);
            adj_.emplace_back();
        }
        return it->second;
    }

    void add_edge(const std::string& from, const std::string& to, double w) {
        if (w < 0) throw std::invalid_argument("Dijkstra needs non-negative weights");
        int a = node(from), b = node(to);
        adj_[a].push_back({b, w});
    }

    std::optional<int> find(const std::string& name) const {
        auto it = index_.find(name);
        if (it == index_.end()) return std::nullopt;
        return it->second;
    }

    struct Result {
        std::vector<double> dist;
        std::vector<int> prev;
    };

    Result shortest_paths(int source) const {
        const double inf = std::numeric_limits<double>::infinity();
        Result r{std::vector<double>(names_.size(), inf), std::vector<int>(names_.size(), -1)};
        using Item = std::pair<double, int>;  // (distance, node), smallest first
        std::priority_queue<Item, std::vector<Item>, std::greater<>> pq;
        r.dist[source] = 0;
        pq.push({0, source});
        while (!pq.empty()) {
            auto [d, u] = pq.top();
            pq.pop();
            if (d > r.dist[u]) continue;  // stale entry: a shorter path was found already
            for (const auto& [v, w] : adj_[u]) {
                if (r.dist[u] + w < r.dist[v]) {
                    r.dist[v] = r.dist[u] + w;
                    r.prev[v] = u;
                    pq.push({r.dist[v], v});
                }
            }
        }
        return r;
    }

    std::vector<std::string> path(const Result& r, int target) const {
        std::vector<std::string> out;
        for (int v = target; v != -1; v = r.prev[v]) out.push_back(names_[v]);
        return {out.rbegin(), out.rend()};
    }

private:
    struct Edge {
        int to;
        double weight;
    };
    std::unordered_map<std::string, int> index_;
    std::vector<std::string> names_;
    std::vector<std::vector<Edge>> adj_;
};

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " FROM TO < edges.txt\n";
        return 2;
    }
    Graph g;
    std::string line;
    int line_no = 0;
    while (std::getline(std::cin, line)) {
        ++line_no;
        if (line.empty() || line[0] == '#') continue;
        std::istringstream in(line);
        std::string a, b;
        double w;
        if (!(in >> a >> b >> w)) {
            std::cerr << "line " << line_no << ": expected 'from to weight'\n";
            return 1;
        }
        g.add_edge(a, b, w);
    }
    auto src = g.find(argv[1]);
    auto dst = g.find(argv[2]);
    if (!src || !dst) {
        std::cerr << "unknown node\n";
        return 1;
    }
    auto result = g.shortest_paths(*src);
    if (result.dist[*dst] == std::numeric_limits<double>::infinity()) {
        std::cout << "no path from " << argv[1] << " to " << argv[2] << "\n";
        return 0;
    }
    auto p = g.path(result, *dst);
    for (size_t i = 0; i < p.size(); ++i) std::cout << (i ? " -> " : "") << p[i];
    std::cout << " (cost " << result.dist[*dst] << ")\n";
}
